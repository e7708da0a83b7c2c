"""epispec training side: corpora, tokenizers, targets, ensembles, OSD/DDD drafts, bundles
(evaluation is `measure.evaluation`)."""
