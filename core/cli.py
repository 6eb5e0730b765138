"""The ``kvmarina`` command.

Core subcommands (``version``, ``validate``, ``blocks``, ``crds``, ``model``) live here.
The parts' subcommands are dispatched lazily: ``PART_COMMANDS`` maps a name to a
module that exposes ``main(argv: list[str]) -> int`` and owns its own argument
parsing, so ``kvmarina --help`` never imports torch, aiohttp or kopf.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable

from kvmarina import __version__

# name -> (module with main(argv) -> int, one-line help)
PART_COMMANDS: dict[str, tuple[str, str]] = {
    "agent": ("kvmarina.agent.main", "run the node agent (KV memory pool, index, events)"),
    "engine": ("kvmarina.engine.main", "run the reference model server"),
    "router": ("kvmarina.router.main", "run the cache-aware router"),
    "operator": ("kvmarina.operator.main", "run the Kubernetes operator (kopf)"),
    "up": ("kvmarina.local.up", "run a KVCachePool/ModelServing YAML as local processes"),
    "down": ("kvmarina.local.down", "stop a local fleet started by 'up'"),
    "status": ("kvmarina.local.status", "show the local fleet"),
    "demo": ("kvmarina.local.demo", "bring up a small local fleet and compare routing policies"),
}


# What the base install (operator, router) lacks, and the extra that brings it.
EXTRA_OF_MODULE = {"torch": "agent", "xxhash": "agent", "crc32c": "agent", "safetensors": "engine"}


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmarina",
        description="KV-cache-aware LLM fleets: operator, node agent, engine, router.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("version", help="print the version")

    p_val = sub.add_parser("validate", help="check KVCachePool/ModelServing YAML files")
    p_val.add_argument(
        "-f",
        "--file",
        dest="files",
        action="append",
        required=True,
        metavar="FILE",
        help="a YAML file (repeatable; '-' for stdin)",
    )

    p_blk = sub.add_parser("blocks", help="print the contract hash of every full block of stdin")
    p_blk.add_argument(
        "--model-identity", required=True, help="the model identity string the engines hash with"
    )
    p_blk.add_argument("--block-size", type=int, default=16, help="tokens per block (16)")
    p_blk.add_argument("--salt", default="", help="tenant salt ('' for none)")
    p_blk.add_argument("--algorithm", default="blake2b", help="blake2b (default) or sha256")
    p_blk.add_argument("--digest-bits", type=int, default=128, help="digest length (128)")

    p_mod = sub.add_parser("model", help="write a preset model as a Hugging Face folder")
    mod = p_mod.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    p_exp = mod.add_parser(
        "export",
        help="config, byte-level tokenizer, chat template and seeded weights of a preset "
        "(for engines that load only folders, such as vLLM)",
    )
    p_exp.add_argument("--preset", required=True, help="tiny or small")
    p_exp.add_argument("--dtype", default="float32", help="float32 (default), float16, bfloat16")
    p_exp.add_argument("--out", required=True, help="the folder to write")
    p_exp.add_argument(
        "--no-weights",
        action="store_true",
        help="tokenizer and config.json only (what a router reads; needs no torch)",
    )

    p_con = sub.add_parser("connector", help="kvmarina's KV connector for other engines")
    con = p_con.add_subparsers(dest="connector_command", metavar="ACTION", required=True)
    p_ins = con.add_parser(
        "install",
        help="copy the connector (kvmarina's core, agent client and connector) and msgpack "
        "into a folder another engine's Python finds on its PYTHONPATH (a vLLM pod's "
        "init container does)",
    )
    p_ins.add_argument("--into", required=True, help="the folder to fill")

    p_crd = sub.add_parser("crds", help="print the CustomResourceDefinitions as YAML")
    p_crd.add_argument("--out", help="write one file per CRD into this folder")

    for name, (module, help_text) in PART_COMMANDS.items():
        suffix = "" if _available(module) else " (not available in this build yet)"
        sub.add_parser(name, help=help_text + suffix, add_help=False)
    return parser


def _run_part(name: str, argv: list[str]) -> int:
    module_name, _ = PART_COMMANDS[name]
    if not _available(module_name):
        print(
            f"kvmarina {name}: not available in this build yet ({module_name} is missing)",
            file=sys.stderr,
        )
        return 2
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF_MODULE.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(
            f"kvmarina {name}: needs {exc.name}, which this install lacks; install the "
            f"'{extra}' extra: pip install 'kvmarina[{extra}]' (or 'kvmarina[all]')",
            file=sys.stderr,
        )
        return 2
    entry: Callable[[list[str]], int] = module.main
    return int(entry(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in PART_COMMANDS:
        return _run_part(args_list[0], args_list[1:])
    parser = _build_parser()
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "version":
        print(f"kvmarina {__version__}")
        return 0
    if args.command == "validate":
        from kvmarina.validate import validate_files

        return validate_files(args.files)
    if args.command == "blocks":
        return _blocks(args)
    if args.command == "model":
        return _export_model(args)
    if args.command == "connector":
        from kvmarina.hosting import install_connector

        print(f"connector installed into {install_connector(args.into)}")
        return 0
    if args.command == "crds":
        from kvmarina.crd import write_crds

        return write_crds(args.out)
    parser.error(f"unknown command {args.command!r}")
    return 2


def _export_model(args: argparse.Namespace) -> int:
    from kvmarina.presets import PresetError, write_preset_folder

    try:
        if args.no_weights:
            out = write_preset_folder(args.preset, args.dtype, args.out)
        else:  # the weights are the reference engine's seeded model (torch)
            weights = importlib.import_module("kvmarina.engine.weights")
            out = weights.export_preset(args.preset, args.dtype, args.out)
    except (PresetError, OSError) as exc:
        print(f"kvmarina model export: {exc}", file=sys.stderr)
        return 2
    print(f"wrote preset {args.preset} ({args.dtype}) to {out}")
    return 0


def _blocks(args: argparse.Namespace) -> int:
    from kvmarina.hashing import HashContract, HashingError
    from kvmarina.tokenizer import ByteTokenizer

    try:
        contract = HashContract(args.block_size, args.algorithm, args.digest_bits // 8)
    except HashingError as exc:
        print(f"kvmarina blocks: {exc}", file=sys.stderr)
        return 2
    text = sys.stdin.read()
    tokens = ByteTokenizer().encode(text)
    hashes = contract.block_hashes(tokens, args.model_identity, args.salt)
    for i, h in enumerate(hashes):
        print(f"{i}\t{h.hex()}")
    tail = len(tokens) - len(hashes) * contract.block_size
    print(
        f"# {len(tokens)} tokens, {len(hashes)} full blocks of {contract.block_size}, "
        f"{tail} trailing tokens not hashed ({contract.describe()})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
