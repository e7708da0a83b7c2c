"""`epispec eval [--quick] --out DIR`: is the drafts' EU the ensemble's EU, and does it catch
hallucinated calculator results? Writes DIR/results.json, DIR/report.md and PNG plots.

Models are trained on the fly under DIR/models (reused when rerun) unless folders are given:
`--ensemble` (member 0 is the served target), `--drafts`, `--drafts-no-ddd`, `--drafts-no-osd`.
`--calibrate-bundle B` writes the validation-chosen eu threshold into B/bundle.json.

`--bundle B` evaluates a served bundle as it is — a pretrained target (SmolLM2) and its drafts,
nothing trained (`pretrained.py`, docs/evaluation-at-scale.md): token labels teacher-forced up to
`<<expr=` on GSM8K test problems (validation: train problems), EU* and a second ground truth, the
upper bound, TokUR, the arithmetic response set, p_error and p_wrong; GSM8K data required;
`--quick` is its 4 + 4-problem size. With `--calibrate-bundle B` too, the eu threshold, the
`p_wrong` and `p_error` fits and the `eu_correction` of lower validation RMSE (all from
validation) are written into B/bundle.json.
`--report DIR` runs nothing: it regenerates DIR/report.md and the documentation's tables from
DIR/results.json, prints the tables, and with `--readme docs/evaluation.md` splices them in between the
`<!-- eval-table:start -->` / `<!-- eval-table:end -->` markers — for an earlier bundle run's
results, its goal table between `<!-- eval-bundle-goals:start -->` / `<!-- eval-bundle-goals:end -->`
(`goals.py`); for a bundle run at scale, the `eval-scale-tables` and `eval-scale-goals` blocks of
the file given to `--readme` (docs/evaluation-at-scale.md, `scale_report.py`).
`--served [URL]` is the black-box check of a running server (default: spawn `epispec serve
--serve FLAGS`): short known-answer questions through the chat endpoint with the `openai` client
at T = 0, mean eu against the target's mean negative log-prob as detectors of wrong answers
(`served.py`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from drafts.corpus import GSM8K as DEFAULT_DATA  # shipped with the project (data/gsm8k/README.md)
from drafts.corpus import split_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny models, ~30 questions, < 5 minutes on CPU")
    parser.add_argument("--out", default=None, help="output folder (required unless --report)")
    parser.add_argument(
        "--report",
        default=None,
        metavar="DIR",
        help="regenerate DIR/report.md and the docs' tables from DIR/results.json; run nothing",
    )
    parser.add_argument(
        "--readme",
        default=None,
        metavar="PATH",
        help="with --report: splice the tables into PATH between the eval-table markers "
        "(eval-bundle-goals for a bundle's results; docs/evaluation.md)",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="GSM8K-format folder/JSONL, a datasets name, or 'synthetic' (default: GSM8K as shipped in "
        "data/gsm8k; with --quick: synthetic)",
    )
    parser.add_argument(
        "--bundle",
        default=None,
        metavar="DIR",
        help="evaluate this bundle's own (pretrained) target and drafts on GSM8K; trains nothing",
    )
    parser.add_argument("--work", default=None, help="model folder cache (default OUT/models)")
    parser.add_argument("--ensemble", nargs="+", default=None, metavar="DIR", help="trained ensemble members")
    parser.add_argument("--drafts", nargs="+", default=None, metavar="DIR", help="OSD+DDD drafts (ours)")
    parser.add_argument("--drafts-no-ddd", nargs="+", default=None, metavar="DIR")
    parser.add_argument("--drafts-no-osd", nargs="+", default=None, metavar="DIR")
    g = parser.add_argument_group("recipe overrides")
    for name, typ in (
        ("train-records", int),
        ("test-questions", int),
        ("val-questions", int),
        ("target-steps", int),
        ("draft-steps", int),
        ("max-new-tokens", int),
        ("tokur-samples", int),
        ("osd", str),
        ("posterior-samples", int),
        ("posterior-noise", float),
        ("posterior-rank", int),
        ("posterior-layers", int),
        ("tokur-noise", float),
        ("truth2-samples", int),
        ("truth2-noise", float),
        ("responses-val", int),
        ("responses-test", int),
        ("max-cuts", int),
    ):
        g.add_argument(f"--{name}", type=typ, default=None)
    parser.add_argument("--fpr", type=float, default=0.1, help="target false-positive rate of the flag")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument(
        "--calibrate-bundle",
        default=None,
        metavar="DIR",
        help="write the calibrated eu threshold into DIR/bundle.json",
    )
    parser.add_argument(
        "--calibrate-only",
        action="store_true",
        help="calibrate only the bundle of --calibrate-bundle (default: the default bundle, "
        "$EPISPEC_BUNDLE else bundles/smollm2) with its own target and drafts",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)"
    )
    parser.add_argument("--no-progress", action="store_true")
    s = parser.add_argument_group("served black-box check (--served)")
    s.add_argument(
        "--served",
        nargs="?",
        const="spawn",
        default=None,
        metavar="URL",
        help="ask the running server at URL (without URL: spawn one with --serve FLAGS)",
    )
    s.add_argument("--serve", default="", metavar="FLAGS", help="flags for the spawned `epispec serve`")
    s.add_argument("--api-key", default=None, help="bearer key for the server")
    s.add_argument("--questions", type=int, default=160, help="questions, half arithmetic, half capitals")
    s.add_argument("--seed", type=int, default=0, help="seed of the question draw")
    s.add_argument("--max-tokens", type=int, default=24, help="max_tokens of each answer")
    s.add_argument("--concurrency", type=int, default=8, help="requests in flight")


def _command_line() -> str:
    """This run's command as a user typed it, for the results' records."""
    return "epispec eval " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["eval"] else sys.argv[1:])


def _data(arg: str | None, quick: bool) -> str | None:
    """None means the synthetic corpus. --quick defaults to it: tiny models trained for a minute
    on GSM8K write no checkable calculator annotation (measured: 0 of 30 generations), which
    leaves detection undefined."""
    if arg == "synthetic" or (arg is None and quick):
        return None
    if arg is None:
        return str(DEFAULT_DATA) if split_file(DEFAULT_DATA, "test").is_file() else None
    return arg


def is_bundle_results(results: dict) -> bool:
    """Whether results.json is from `epispec eval --bundle B` (`pretrained.py`)."""
    return str(results.get("recipe", {}).get("name", "")).startswith("bundle")


def regenerate(results_dir: str, readme: str | None) -> int:
    from measure.evaluation import report

    path = Path(results_dir) / "results.json"
    try:
        results = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"epispec eval: --report needs a readable {path}: {exc}", file=sys.stderr)
        return 2
    from measure.evaluation import scale_report, served

    if served.is_served_results(results):  # `epispec eval --served`: its report only
        text = served.markdown(results, results["command"])
        (Path(results_dir) / "report.md").write_text(text)
        print(text, end="")
        return 0
    if scale_report.is_scale_results(results):  # `epispec eval --bundle B` at scale: two blocks
        plots = sorted(p.name for p in Path(results_dir).glob("*.png"))
        (Path(results_dir) / "report.md").write_text(scale_report.markdown(results, plots))
        blocks = [
            (scale_report.tables_block(results, str(path)), scale_report.TABLES),
            (scale_report.goals_block(results, str(path)), scale_report.GOALS),
        ]
        if readme:
            try:
                for block, where in blocks:
                    where.write_into(readme, block)
            except (OSError, ValueError) as exc:
                print(f"epispec eval: --readme {readme}: {exc}", file=sys.stderr)
                return 2
        print("".join(b for b, _ in blocks), end="")
        return 0
    if is_bundle_results(results):  # an earlier `epispec eval --bundle B`: its report and the goal table
        from measure.evaluation import goals

        (Path(results_dir) / "report.md").write_text(report.bundle_markdown(results))
        block, where = goals.readme_block(results, str(path)), goals.BLOCK
    else:
        plots = sorted(p.name for p in Path(results_dir).glob("*.png"))
        (Path(results_dir) / "report.md").write_text(report.markdown(results, results["command"], plots))
        block, where = report.readme_block(results, str(path)), report.BLOCK
    if readme:
        try:
            where.write_into(readme, block)
        except (OSError, ValueError) as exc:
            print(f"epispec eval: --readme {readme}: {exc}", file=sys.stderr)
            return 2
    print(block, end="")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.report:
        return regenerate(args.report, args.readme)
    if not args.out:
        print("epispec eval: --out DIR is required (or --report DIR to regenerate tables).", file=sys.stderr)
        return 2
    if args.served:
        return run_served(args)
    if args.bundle:
        return run_bundle(args)
    import torch

    from measure.evaluation import pipeline, plots, recipe, report
    from measure.evaluation.calibrate import write_threshold
    from server.engine.models import ModelFolderError

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = recipe.with_overrides(
        recipe.QUICK if args.quick else recipe.FULL,
        train_records=args.train_records,
        test_questions=args.test_questions,
        val_questions=args.val_questions,
        target_steps=args.target_steps,
        draft_steps=args.draft_steps,
        max_new_tokens=args.max_new_tokens,
        tokur_samples=args.tokur_samples,
        osd=args.osd,
    )
    opts = pipeline.Options(
        recipe=rec,
        out=out,
        data=_data(args.data, args.quick),
        work=Path(args.work) if args.work else out / "models",
        ensemble=args.ensemble,
        fpr=args.fpr,
        bootstrap=args.bootstrap,
        progress=not args.no_progress,
        draft_sets={"ours": args.drafts, "no_ddd": args.drafts_no_ddd, "no_osd": args.drafts_no_osd},
    )
    if args.calibrate_only:
        if not args.calibrate_bundle:  # the default bundle ($EPISPEC_BUNDLE, else bundles/smollm2)
            from server.bundle import default_bundle_dir

            args.calibrate_bundle = str(default_bundle_dir())
        try:
            calib = pipeline.calibrate_bundle(args.calibrate_bundle, opts.data, rec, args.fpr)
        except (ValueError, FileNotFoundError, ModelFolderError) as exc:
            print(f"epispec eval: {exc}", file=sys.stderr)
            return 2
        report.write_json(calib, out / "calibration.json")
        print(json.dumps(report.clean(calib), indent=2))
        return 0
    try:
        results = pipeline.run(opts)
        if args.calibrate_bundle and "threshold" in results["calibration"]:
            results["calibration"]["written_to"] = str(
                write_threshold(args.calibrate_bundle, results["calibration"])
            )
    except (ValueError, FileNotFoundError, ModelFolderError) as exc:
        print(f"epispec eval: {exc}", file=sys.stderr)
        return 2
    files = plots.write_plots(results, out)
    command = _command_line()
    results["command"] = command
    report.write_json(results, out / "results.json")
    (out / "report.md").write_text(report.markdown(results, command, files))
    print(
        f"wrote {out / 'results.json'}, {out / 'report.md'} and {len(files)} plots "
        f"(RMSE ours {results['rmse']['ours']:.4f}, reduction vs best baseline "
        f"{100 * results['rmse_reduction_vs_best_baseline']:.1f}%, AUROC eu {results['auroc']['eu']:.3f} "
        f"tokur {results['auroc']['tokur']:.3f})"
    )
    return 0


def run_bundle(args: argparse.Namespace) -> int:
    """`epispec eval --bundle B`: the bundle's own models at scale (`pretrained.py`)."""
    import torch

    from measure.evaluation import correction, p_error, p_wrong, pretrained, report, scale_plots, scale_report
    from measure.evaluation.calibrate import write_threshold
    from server.bundle import BundleError
    from server.engine.models import ModelFolderError

    data = _data(args.data, quick=False)
    if data is None:
        print(
            "epispec eval: --bundle needs GSM8K data (--data DIR); the synthetic corpus has no chat "
            "target's questions.",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = pretrained.with_overrides(
        pretrained.BUNDLE_QUICK if args.quick else pretrained.BUNDLE_FULL,
        test_questions=args.test_questions,
        val_questions=args.val_questions,
        max_new_tokens=args.max_new_tokens,
        tokur_samples=args.tokur_samples,
        tokur_noise=args.tokur_noise,
        posterior_samples=args.posterior_samples,
        posterior_noise=args.posterior_noise,
        posterior_rank=args.posterior_rank,
        posterior_layers=args.posterior_layers,
        truth2_samples=args.truth2_samples,
        truth2_noise=args.truth2_noise,
        responses_val=args.responses_val,
        responses_test=args.responses_test,
        max_cuts=args.max_cuts,
    )
    try:
        results = pretrained.run(args.bundle, data, rec, args.bootstrap, args.fpr)
        if args.calibrate_bundle:
            target = args.calibrate_bundle
            if "threshold" in results["calibration"]:
                results["calibration"]["written_to"] = str(write_threshold(target, results["calibration"]))
            if results["_fit"] is not None:
                results["p_wrong"]["written_to"] = str(p_wrong.write(target, results["_fit"]))
            if results["_p_error"] is not None:
                results["p_error"]["written_to"] = str(p_error.write(target, results["_p_error"]))
            name, best = correction.best(results["_corrections"])
            source = {
                "bundle": str(args.bundle),
                "ground_truth": results["ground_truth"],
                "data": results["data"],
            }
            results["corrections"][name]["written_to"] = str(correction.write(target, name, best, source))
    except (ValueError, FileNotFoundError, ModelFolderError, BundleError) as exc:
        print(f"epispec eval: {exc}", file=sys.stderr)
        return 2
    results["command"] = "epispec eval " + shlex.join(
        sys.argv[2:] if sys.argv[1:2] == ["eval"] else sys.argv[1:]
    )
    files = scale_plots.write(results, out)
    report.write_json(results, out / "results.json")
    # from the JSON data (NaN as null), as `--report` regenerates it
    (out / "report.md").write_text(scale_report.markdown(report.clean(results), files))
    auroc = results.get("auroc") or {}
    tl = results["token_labels"]
    print(
        f"wrote {out / 'results.json'}, {out / 'report.md'} and {len(files)} plots ({tl['tokens']} labelled "
        f"tokens of {tl['problems']} problems, AUROC eu {auroc.get('eu', float('nan')):.3f}, p_error "
        f"{auroc.get('p_error', float('nan')):.3f}, tokur {auroc.get('tokur', float('nan')):.3f}; "
        f"{results['seconds']['total']:.0f} s)"
    )
    return 0


def run_served(args: argparse.Namespace) -> int:
    """`epispec eval --served [URL]`: the black-box check (`served.py`)."""
    import openai

    from measure.evaluation import served
    from measure.load.probe import LoadError, spawn_server, stop_server

    command = _command_line()
    proc = None
    try:
        if args.served == "spawn":
            proc, url = spawn_server(args.serve, args.api_key, timeout=600)
        else:
            url = args.served.rstrip("/")
        res = served.run(
            url,
            args.api_key,
            Path(args.out),
            n=args.questions,
            seed=args.seed,
            max_tokens=args.max_tokens,
            concurrency=args.concurrency,
            bootstrap=args.bootstrap,
            progress=not args.no_progress,
            command=command,
        )
    except (ValueError, LoadError, openai.OpenAIError) as exc:
        print(f"epispec eval --served: {exc}", file=sys.stderr)
        return 2
    finally:
        if proc is not None:
            stop_server(proc)
    print(served.markdown(res, command), end="")
    return 0
