"""epispec serving side: engines, HTTP API, metrics, the `epispec` command line."""
