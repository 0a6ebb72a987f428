"""Command line: `python -m workbench COMMAND`. With --json, results go to stdout and logs to stderr."""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger("workbench")


class UserError(Exception):
    """Reported as one clear line, without a traceback."""


def _load_model(path: str | None):
    from .model import load_onnx, reference_unet

    return load_onnx(path) if path else reference_unet()


def _emit(args, payload, human) -> None:
    if args.json:
        json.dump(payload, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
    else:
        print(human())


def _device_args(parser) -> None:
    parser.add_argument("--tracker", help="remote RPC tracker HOST:PORT (default: a local cluster on loopback)")
    parser.add_argument("--key", help="device key registered at the tracker")
    parser.add_argument("--target", help="'host', 'armv7', 'aarch64' or a JSON target dict (default: host)")
    parser.add_argument("--threads", type=int, default=None, help="threads on the device (default: all cores)")


# ---------------------------------------------------------------- commands

def cmd_layers(args) -> None:
    from .intensity import layer_table, table_records

    model = _load_model(args.model)
    table = layer_table(model)
    _emit(args, table_records(table), lambda: table.to_string(index=False))


def cmd_ceilings(args) -> None:
    from .ceilings import measure_ceilings
    from .rpc import open_device

    with open_device(args.tracker, args.key, args.target, args.threads) as device:
        result = measure_ceilings(device, quick=args.quick)
    _emit(args, result.to_dict(), lambda: result.summary())


def cmd_compare(args) -> None:
    from .compare import compare, json_rows, table
    from .measure import TimingConfig
    from .records import WorkDir
    from .rpc import open_device

    model = _load_model(args.model)
    layers = args.layers.split(",") if args.layers else None
    model.select_convs(layers)  # fail on unknown names before starting a device
    timing = TimingConfig.quick() if args.quick else TimingConfig()
    store = WorkDir.at(args.work_dir).records
    with open_device(args.tracker, args.key, args.target, args.threads) as device:
        records = compare(model, device, layers, timing=timing, store=store, resume=not args.fresh,
                          progress=not args.json)
    _emit(args, json_rows(records), lambda: table(records).to_string(index=False))


def cmd_serve(args) -> None:
    from .rpc import serve

    serve(args.host, args.port, args.tracker, args.key or "workbench", args.threads, args.allow_remote)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workbench", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layers", help="the layer table: shapes, FLOPs, bytes, arithmetic intensity")
    p.add_argument("--model", help="an ONNX file (default: the reference UNet)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("ceilings", help="measured peak GFLOP/s and memory bandwidth of a device")
    _device_args(p)
    p.add_argument("--quick", action="store_true", help="fewer repeats (for tests)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ceilings)

    p = sub.add_parser("compare", help="every NNPACK algorithm x strategy and TVM on every conv, over RPC")
    p.add_argument("--model", help="an ONNX file (default: the reference UNet)")
    p.add_argument("--layers", help="comma-separated conv names (default: all convs)")
    p.add_argument("--work-dir", help="where records and tuning databases are kept (default: data/)")
    p.add_argument("--fresh", action="store_true", help="measure again even if records exist")
    p.add_argument("--quick", action="store_true", help="fewer, shorter repeats")
    _device_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("serve", help="an RPC server with the NNPACK bridge registered")
    p.add_argument("--tracker", help="register at this tracker HOST:PORT")
    p.add_argument("--key", default="workbench")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--allow-remote", action="store_true", help="allow binding beyond loopback (trusted networks only)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    from .model import ModelError
    from .rpc import DeviceError

    try:
        args.func(args)
    except (UserError, ModelError, DeviceError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
