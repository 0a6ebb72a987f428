"""Command line: `python -m workbench COMMAND`. With --json, results go to stdout and logs to stderr."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from . import interrupts
from .errors import UserError, WorkbenchError
from .threads import check_positive, resolve_threads

log = logging.getLogger("workbench")

# Commands that measure on a device: a local cluster, or a remote one with --tracker.
DEVICE_COMMANDS = ("ceilings", "compare", "tune", "study", "fp16")


def _load_model(path: str | None, network: str | None = None, resolution: int | None = None):
    from .model import load_onnx, reference_unet
    from .networks import RESOLUTION, network as defined_network

    if path is not None and network is not None:
        raise UserError("--model and --network both name a model; pass one of them")
    if resolution is not None and network is None:
        raise UserError("--resolution sizes a --network (the UNet and ONNX files carry their own size); "
                        "pass --network too, or leave --resolution out")
    if network is not None:
        return defined_network(network, RESOLUTION if resolution is None else resolution)
    # Only a missing --model means the reference UNet: an empty path is an error, not a default.
    model = load_onnx(path) if path is not None else reference_unet()
    for note in model.notes:  # renamed layers, say: the names the user will see in results
        log.warning("%s: %s", model.name, note)
    return model


def _layer_names(text: str | None) -> list[str] | None:
    """--layers as names: split at commas, spaces around each name dropped ("a, b" is a and b)."""
    return [name.strip() for name in text.split(",")] if text else None


def _emit(args, payload, human) -> None:
    if args.json:
        json.dump(payload, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
    else:
        print(human())


COMMON = {
    "--model": dict(help="an ONNX file (default: the reference UNet)"),
    "--layers": dict(help="comma-separated conv names (default: all convs)"),
    "--work-dir": dict(help="records, tuning databases, the hybrid and report.html (default: data/)"),
    "--json": dict(action="store_true", help="machine-readable output on stdout"),
}


def _common(parser, *names) -> None:
    from .networks import NETWORKS

    for name in names:
        parser.add_argument(name, **COMMON[name])
        if name == "--model":  # a network the workbench defines, instead of a file
            parser.add_argument("--network", choices=NETWORKS,
                                help="MobileNetV2, SqueezeNet 1.1 or ShuffleNetV2 x1.0, defined here (instead of --model)")
            parser.add_argument("--resolution", type=int, help="the --network's input size (default 224)")


def _device_args(parser, farm: bool = False) -> None:
    parser.add_argument("--tracker", help="remote RPC tracker HOST:PORT (default: a local cluster on loopback)")
    parser.add_argument("--key", help="device key registered at the tracker (default: $WORKBENCH_RPC_KEY, else 'workbench')")
    parser.add_argument("--target", help="'host', 'armv7', 'aarch64' or a JSON target dict (default: host)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads on the device (default: all cores; on a local farm, the cores shared out)")
    if farm:
        parser.add_argument("--servers", type=int, default=1,
                            help="a local farm: N servers under one key, measured in parallel (default: 1; with "
                                 "--tracker, every server registered for the key is used)")


# ---------------------------------------------------------------- the door

def check_arguments(args) -> None:
    """Every flag checked before a model is read or a device starts; a bad one is one line."""
    command = args.command
    remote = command in DEVICE_COMMANDS and bool(args.tracker)
    if getattr(args, "tracker", None) is not None:
        from .rpc import parse_tracker

        parse_tracker(args.tracker)
    _check_key(args, command)
    if "threads" in args:
        args.threads = _checked_threads(args.threads, command, remote)
    if getattr(args, "target", None) is not None:
        _check_target(args.target, args.threads, remote)
    if getattr(args, "trials", None) is not None and args.trials < 1:
        raise UserError(f"--trials must be at least 1, got {args.trials}")
    if getattr(args, "layers", None) is not None and "" in _layer_names(args.layers or ","):
        raise UserError(f"--layers {args.layers!r} has an empty name; give conv names separated by commas "
                        "(python -m workbench layers lists them)")
    if getattr(args, "port", None) is not None and not 0 < args.port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    if getattr(args, "work_dir", None) is not None:
        from .records import WorkDir

        WorkDir.at(args.work_dir)  # checked, not created: a bad path fails before anything is measured
    if getattr(args, "servers", 1) != 1:
        _check_servers(args, remote)


def _check_servers(args, remote) -> None:
    from .rpc import check_farm, farm_threads

    if remote:
        raise UserError("--servers starts a local farm; with --tracker, every server registered for the key "
                        "measures (start more servers on the board side instead)")
    if args.servers < 1:
        raise UserError(f"--servers must be at least 1, got {args.servers}")
    check_farm(args.servers, args.threads or farm_threads(args.servers))


def _check_key(args, command) -> None:
    key = getattr(args, "key", None)
    if key is None:
        return
    if not key.strip():
        raise UserError("--key is empty; give the key the device's server registered (e.g. rpi)")
    if command in DEVICE_COMMANDS and not args.tracker:
        raise UserError(f"--key {key!r} names a device at a remote tracker; pass --tracker HOST:PORT too "
                        "(without it, a local cluster on this machine is used)")


def _checked_threads(threads, command, remote):
    """None stays None where the device decides (every core); export and serve run here."""
    if remote:
        return None if threads is None else check_positive(threads)  # the device's cores: checked on connecting
    checked = resolve_threads(threads)  # this machine's cores bound it
    return checked if command not in DEVICE_COMMANDS or threads is not None else None


def _check_target(target, threads, remote) -> None:
    from .targets import check_device, device_info, resolve_target

    checked, _ = resolve_target(target, threads)
    if not remote:
        checked.setdefault("num-cores", resolve_threads(None))
        check_device(checked, device_info(), "this machine (the local cluster)")


class _Parser(argparse.ArgumentParser):
    """argparse, with a misused flag reported as one line like every other error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        # argparse reports flags no subcommand took from the top-level parser: name the subcommand's help.
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(parsed, "command", None)
            prog = f"{self.prog} {command}" if command else self.prog
            self.exit(2, f"error: unrecognized arguments: {' '.join(extras)} (see {prog} --help)\n")
        return parsed


# ---------------------------------------------------------------- commands

def cmd_layers(args) -> None:
    from .intensity import layer_table, table_records

    model = _load_model(args.model, args.network, args.resolution)
    table = layer_table(model)
    _emit(args, table_records(table), lambda: table.to_string(index=False))


def cmd_ceilings(args) -> None:
    from .ceilings import measure_ceilings
    from .rpc import open_device

    from .report import device_line

    with open_device(args.tracker, args.key, args.target, args.threads) as device:
        result = measure_ceilings(device, quick=args.quick)
    _emit(args, result.to_dict(), lambda: f"{device_line(device.describe())}\n{result.summary()}")


def cmd_compare(args) -> None:
    from . import tuning
    from .compare import compare, json_rows, table
    from .kernels.registry import all_candidates
    from .measure import TimingConfig
    from .records import WorkDir
    from .report import device_line
    from .rpc import open_device

    model = _load_model(args.model, args.network, args.resolution)
    layers = _layer_names(args.layers)
    model.select_convs(layers)  # fail on unknown names before starting a device
    timing = TimingConfig.quick() if args.quick else TimingConfig()
    work = WorkDir.at(args.work_dir)
    with work.lock("compare"), open_device(args.tracker, args.key, args.target, args.threads, args.servers) as device:
        # NNPACK and TVM's default, the hand schedules, and tvm:tuned where the work dir has tuning records.
        tuned = tuning.tuned_layers(model, device.target, work.tuning)
        candidates = all_candidates(int(device.target.get("num-cores") or 1), work.tuning, tuned,
                                    target=device.target, emulated=device.emulated, machine=device.info.get("machine"))
        records = compare(model, device, layers, candidates=candidates, timing=timing, store=work.records,
                          resume=not args.fresh, progress=not args.json)
    _emit(args, json_rows(records), lambda: f"{device_line(device.describe())}\n{table(records).to_string(index=False)}")


def cmd_fp16(args) -> None:
    from . import fp16
    from .records import WorkDir
    from .report import device_line
    from .rpc import open_device

    chosen = args.model is not None or args.network is not None
    model = _load_model(args.model, args.network, args.resolution) if chosen else fp16.probe_model()
    layers = _layer_names(args.layers) or (None if chosen else list(fp16.PROBE_LAYERS))
    layers = fp16.winograd_layers(model, layers)  # a conv FP16 Winograd cannot run fails before a device starts
    work = WorkDir.at(args.work_dir)
    with work.lock("fp16"), open_device(args.tracker, args.key, args.target, args.threads) as device:
        rows = fp16.fp16_numerics(device, model, layers, store=work.records)
    _emit(args, rows, lambda: "\n".join([device_line(device.describe()), *map(fp16.row_line, rows),
                                         *map(fp16.sentence, fp16.summary(rows))]))


def cmd_tune(args) -> None:
    from .records import WorkDir
    from .report import device_line
    from .rpc import open_device

    model = _load_model(args.model, args.network, args.resolution)
    layers = _layer_names(args.layers)
    model.select_convs(layers)
    work = WorkDir.at(args.work_dir)
    spaces = ("hand", "metaschedule") if args.space == "all" else (args.space,)
    with work.lock("tune"), open_device(args.tracker, args.key, args.target, args.threads, args.servers) as device:
        results = []
        for space in spaces:
            results += _tune(space, model, device, args.trials, work.tuning, layers, args.whole_model,
                             progress=not args.json)
        for result in results:
            work.records.append("tuning", result.to_dict(), model=model.name, device=device.describe(),
                                emulated=device.emulated)
    rows = [{**r.to_dict(), "emulated": device.emulated} for r in results]
    _emit(args, rows, lambda: "\n".join([device_line(device.describe())] + [
        f"{r['layer']} [{r['space']}]: {r['trials']} trials ({r['new_trials']} new, {r['trials_per_minute']:.1f}/min), "
        f"best {_ms(r['best_ms'])}{_point(r['best'])}" for r in rows]))


def _tune(space: str, model, device, trials: int, tuning_dir, layers, whole_model: bool, progress: bool) -> list:
    """One search space's tuning: the knob tuner ("hand") or MetaSchedule's."""
    from . import knob_tuning, tuning

    if space == "hand":
        return knob_tuning.tune_knobs(model, device, trials, tuning_dir, layers=layers, whole_model=whole_model,
                                      progress=progress)
    if whole_model:
        return tuning.tune_model(model, device, trials, tuning_dir, layers=layers, progress=progress)
    return tuning.tune_layers(model, device, trials, tuning_dir, layers=layers, progress=progress)


def _ms(value) -> str:
    return "none" if value is None else f"{value:.4g} ms"


def _point(best: dict) -> str:
    knobs = ", ".join(f"{k}={v}" for k, v in (best.get("knobs") or {}).items())
    return f" with {best['impl']}" + (f" ({knobs})" if knobs else "") if best else ""


def cmd_study(args) -> None:
    from .records import WorkDir
    from .rpc import open_device
    from .study import StudyConfig, run_study

    model = _load_model(args.model, args.network, args.resolution)
    config = StudyConfig.quick_run() if args.quick else StudyConfig()
    if args.trials is not None:
        config.trials = args.trials
    if args.tune:
        config.tune = args.tune
    if args.space:
        config.space = args.space
    config.int8 = args.int8
    work = WorkDir.at(args.work_dir)
    with work.lock("study"), open_device(args.tracker, args.key, args.target, args.threads, args.servers) as device:
        summary = run_study(model, device, work, config, progress=not args.json)
    shown = {k: summary.get(k) for k in ("hybrid_ms", "numerics_ok", "baselines", "ratios", "fusion")}
    if "int8" in summary:  # the end-to-end rows, briefly: the per-conv table is in the report
        shown["int8"] = {r["name"]: {k: r.get(k) for k in ("median_ms", "top1_agreement", "max_rel_err")}
                         for r in summary["int8"]["end_to_end"]}
    _emit(args, summary, lambda: json.dumps(shown, indent=1, default=str) + f"\nreport: {work.report}")


def cmd_export(args) -> None:
    from . import tuning
    from .hybrid import check_export_dir, export_hybrid
    from .kernels.registry import all_candidates
    from .plan import Plan
    from .records import WorkDir
    from .rpc import host_target

    model = _load_model(args.model, args.network, args.resolution)
    work = WorkDir.at(args.work_dir)
    check_export_dir(args.out, args.force)  # before the plan and the build: fail fast, write nothing
    plan_path = work.hybrid / "plan.json"
    if not plan_path.exists():
        raise UserError(f"no plan at {plan_path}; run `python -m workbench study` with this --work-dir first")
    plan = Plan.load(plan_path)
    if plan.model and plan.model != model.name:
        raise UserError(f"the plan in {plan_path} is for model {plan.model!r}, not {model.name!r}; pass the --model "
                        "the study ran on, or run the study for this model with another --work-dir")
    target = host_target(args.threads)
    # tvm:tuned applies only where this target has tuning records: a plan asking for more fails
    # validation, before a build starts (and without creating an empty database).
    tuned = tuning.tuned_layers(model, target, work.tuning)
    candidates = all_candidates(args.threads, tuning_dir=work.tuning, tuned_layers=tuned, target=target)
    plan.validate(model, candidates)
    out = export_hybrid(model, plan, args.out, target, args.threads, candidates, force=args.force)
    _emit(args, {"out": str(out), "plan": {n: e.impl for n, e in plan.layers.items()}}, lambda: f"exported to {out}")


def cmd_report(args) -> None:
    from .bundle import diff_bundles, format_diff, write_bundle
    from .records import WorkDir

    if args.compare:
        if args.out or args.notebooks or args.execute_notebooks:
            raise UserError("--compare A B only reads two bundles; leave out --out and the notebooks")
        diff = diff_bundles(*args.compare)
        _emit(args, diff, lambda: format_diff(diff))
        return
    if not args.out:
        raise UserError("report needs --out BUNDLE (the folder to write), or --compare BUNDLE_A BUNDLE_B")
    work = WorkDir.at(args.work_dir)
    notebooks = list(args.notebooks or ())
    if args.execute_notebooks:
        import tempfile

        from .bundle import execute_notebooks

        write_bundle(work.root, args.out)  # fails at once (one line) if there is no study
        # The executed copies (megabytes of widget state) stay out of the bundle: only their pages go in.
        with work.lock("report"), tempfile.TemporaryDirectory(prefix="workbench-notebooks-") as executed:
            notebooks += execute_notebooks(work.root, executed)
            out = write_bundle(work.root, args.out, notebooks=notebooks)
    else:
        out = write_bundle(work.root, args.out, notebooks=notebooks)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    _emit(args, {"out": str(out), "files": files}, lambda: f"bundle: {out} (open {out / 'index.html'})")


def cmd_serve(args) -> None:
    from .server import serve

    serve(args.host, args.port, args.tracker, args.key, args.threads, args.allow_remote)


def cmd_board(args) -> None:
    from .board import run_board

    try:
        run_board(args.emulate, args.tracker, args.key, args.threads, args.port)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM is how a board is stopped: the server was ended with it
        print("board: stopped", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    from .networks import NETWORKS

    parser = _Parser(prog="python -m workbench", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layers", help="the layer table: shapes, FLOPs, bytes, arithmetic intensity")
    _common(p, "--model", "--json")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("ceilings", help="measured peak GFLOP/s and memory bandwidth of a device")
    _device_args(p)
    p.add_argument("--quick", action="store_true", help="fewer repeats (for tests)")
    _common(p, "--json")
    p.set_defaults(func=cmd_ceilings)

    p = sub.add_parser("compare", help="every NNPACK algorithm x strategy and TVM on every conv, over RPC")
    _common(p, "--model", "--layers", "--work-dir", "--json")
    p.add_argument("--fresh", action="store_true", help="measure again even if records exist")
    p.add_argument("--quick", action="store_true", help="fewer, shorter repeats")
    _device_args(p, farm=True)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("fp16", help="the error NNPACK's FP16 Winograd (wt8x8_fp16) adds over wt8x8 on a device, "
                       "and whether it really stores FP16 there (x86: an alias)")
    p.add_argument("--model", help="an ONNX file (default: a tiny UNet, its 16->16 conv at 24x24 and 64->64 at 12x12)")
    p.add_argument("--network", choices=NETWORKS, help="a network defined here instead (SqueezeNet has 3x3 convs)")
    p.add_argument("--resolution", type=int, help="the --network's input size (default 224)")
    p.add_argument("--layers", help="comma-separated 3x3 stride-1 conv names (default: every such conv of the model)")
    _common(p, "--work-dir", "--json")
    _device_args(p)
    p.set_defaults(func=cmd_fp16)

    p = sub.add_parser("tune", help="auto-tuning of convs over RPC: the hand schedules' knobs (XGBoost-guided, with "
                       "NNPACK's choices) and/or MetaSchedule; resumes from its database")
    _common(p, "--model", "--layers", "--work-dir", "--json")
    p.add_argument("--trials", type=int, required=True,
                   help="trials per conv shape (records already there count); with --whole-model, one budget")
    p.add_argument("--space", choices=("hand", "metaschedule", "all"), default="hand",
                   help="what is searched: the hand schedules' knobs and NNPACK's algorithms (default), "
                        "MetaSchedule's generic space, or both (each with --trials)")
    p.add_argument("--whole-model", action="store_true",
                   help="--trials is one budget for all convs, spent where it pays (every conv gets a start first)")
    _device_args(p, farm=True)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("study", help="the whole study: ceilings, tuning, per-layer comparison, hybrid, peers, report")
    _common(p, "--model", "--work-dir", "--json")
    p.add_argument("--quick", action="store_true", help="a small budget (for CI)")
    p.add_argument("--trials", type=int, help="one tuning budget over the tuned convs, per search space "
                   "(default 240; --quick 12)")
    p.add_argument("--tune", choices=("all", "edges", "none"),
                   help="which convs are tuned (default: all; with --quick: edges)")
    p.add_argument("--space", choices=("hand", "metaschedule", "all"),
                   help="what tuning searches: the hand schedules' knobs and NNPACK's choices (default), "
                        "MetaSchedule's space, or both")
    p.add_argument("--int8", action="store_true", help="also int8: QNNPACK and TVM int8 per conv, the int8 hybrid "
                   "against ONNX Runtime's static quantisation and PyTorch QNNPACK (quantisation error beside each time)")
    _device_args(p, farm=True)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("export", help="write the study's hybrid model, plan and source model to a folder")
    _common(p, "--model", "--work-dir", "--json")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="write into --out even if it is not empty")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="the write-up bundle of a finished study (report, records, plan, environment, "
                       "reproduce.sh), or --compare two bundles")
    _common(p, "--work-dir", "--json")
    p.add_argument("--out", help="the bundle folder to write (created; its files replaced)")
    p.add_argument("--notebooks", nargs="+", help="executed notebooks (.ipynb files or folders) to include as HTML")
    p.add_argument("--execute-notebooks", action="store_true",
                   help="run every notebook on the study's work dir at its budget, and include them (minutes)")
    p.add_argument("--compare", nargs=2, metavar=("BUNDLE_A", "BUNDLE_B"),
                   help="diff two bundles: plan changes (within noise or clear), per layer, end to end, environment")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("serve", help="an RPC server with the NNPACK bridge registered")
    p.add_argument("--tracker", help="register at this tracker HOST:PORT; checked before the server starts: "
                   "a tracker that does not answer within 5 s is an error")
    p.add_argument("--key", help="the device key, the secret clients need (default: $WORKBENCH_RPC_KEY, "
                   "else 'workbench'); the variable keeps it out of the process list")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--allow-remote", action="store_true", help="allow binding beyond loopback (trusted networks only)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("board", help="an emulated aarch64 board (qemu-user) serving at a tracker, until Ctrl-C")
    p.add_argument("--emulate", required=True, choices=("aarch64",), help="the board to emulate")
    p.add_argument("--tracker", required=True, help="register at this tracker HOST:PORT")
    p.add_argument("--key", help="the device key (default: $WORKBENCH_RPC_KEY, else 'workbench')")
    p.add_argument("--port", type=int, default=9090, help="the emulated server's port on loopback")
    p.add_argument("--threads", type=int, default=None, help="threads of the emulated board (default: all cores)")
    p.set_defaults(func=cmd_board)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # MetaSchedule logs every batch at INFO; the progress bar says enough
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    # SIGTERM unwinds like Ctrl-C, so the local cluster and the tuning workers are stopped too. Both
    # are also noted (interrupts.py): an exception raised inside a TVM call can come out as another error.
    interrupts.reset()
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGINT, _interrupted)
    kept = _nothing_written
    try:
        check_arguments(args)  # once, here, before anything starts; resolved values passed down
        kept = _kept_counter(args)
        args.func(args)
    except WorkbenchError as err:  # anything else is a bug: let it surface with its traceback
        if interrupts.pending():  # the device "failed" because the interrupt reached it too
            return _interrupted_exit(kept, interrupts.first())
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        return _interrupted_exit(kept, type(stop))
    finally:
        interrupts.reset()  # a library call after main() in the same process starts afresh
    return 0


def _interrupted_exit(kept, kind: type) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up message
    print(f"\ninterrupted: {kept()}; run the same command again to resume", file=sys.stderr)
    return 143 if issubclass(kind, Terminated) else 130


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that every `with` block cleans up on the way out."""


def _terminated(signum, frame):
    interrupts.note(Terminated)
    raise Terminated()


def _interrupted(signum, frame):
    interrupts.note(KeyboardInterrupt)
    raise KeyboardInterrupt()


def _nothing_written() -> str:
    return "nothing was written"


def _kept_counter(args):
    """A function saying how many results this run added to its (checked) work dir (they are kept)."""
    if not hasattr(args, "work_dir"):
        return _nothing_written
    from .records import WorkDir

    work = WorkDir.at(args.work_dir)

    def lines() -> int:
        try:
            files = [work.records.path, *work.tuning.glob("*/database_tuning_record.json"),
                     *work.tuning.glob("*/knobs.jsonl")]
        except OSError:  # a work dir that is not a folder: the command itself says so
            return 0
        count = 0
        for path in files:
            try:
                with open(path, "rb") as f:
                    count += sum(1 for _ in f)
            except OSError:
                pass
        return count

    before = lines()
    return lambda: f"{lines() - before} new results kept in {work.root}"


if __name__ == "__main__":
    sys.exit(main())
