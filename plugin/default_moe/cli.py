"""`default-moe` command line: inspect routers and validate configs before a job starts."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def _cmd_routers(args: argparse.Namespace) -> int:
    from default_moe.routing import registered_routers

    for name, cls in sorted(registered_routers().items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:12s} {doc}")
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    from default_moe.config import MoEConfig

    try:
        with open(args.path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: cannot read {args.path}: {e}", file=sys.stderr)
        return 2
    if args.section:
        if args.section not in data:
            print(f"error: {args.path} has no {args.section!r} section", file=sys.stderr)
            return 2
        if args.section == "default_moe":
            # A DeepSpeed section: sizes come from the model, so validate it as initialize() will.
            from default_moe.integrations.deepspeed import DeepSpeedMoESection

            try:
                sec = DeepSpeedMoESection.from_ds_config(data)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            print(json.dumps({"enabled": sec.enabled, **sec.overrides}, indent=2))
            print(
                f'valid DeepSpeed "default_moe" section ({"on" if sec.enabled else "off"}); sizes come from the '
                "model's layers at initialize",
                file=sys.stderr,
            )
            return 0
        data = data[args.section]
    data = {k: v for k, v in data.items() if k != "enabled"}
    try:
        cfg = MoEConfig.from_dict(data)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def _cmd_checkpoint_info(args: argparse.Namespace) -> int:
    from default_moe import checkpoint

    try:
        payload = checkpoint.read(args.path)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, cfg in payload["moe_configs"].items():
        print(
            f"{name}: router={cfg['router']} experts={cfg['num_experts']} top_k={cfg['top_k']} "
            f"hidden={cfg['hidden_size']} saved at ep_size={cfg['ep_size']} (loads at any ep_size dividing "
            f"{cfg['num_experts']})"
        )
    print(f"extra: {sorted(payload['extra'])}")
    return 0


def _cmd_convert_deepspeed(args: argparse.Namespace) -> int:
    from default_moe import checkpoint

    if os.path.exists(args.out) and not args.force:
        print(f"error: {args.out} exists; pass --force to replace it", file=sys.stderr)
        return 2
    try:
        extra = checkpoint.convert_deepspeed(args.ckpt_dir, args.out, args.tag, trust_pickle=args.trust_pickle)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out} from {extra['source']} (saved at ep_size={extra['saved_ep_size']}); "
        f"load it at any ep_size with default_moe.checkpoint.load(model, {args.out!r})"
    )
    return _cmd_checkpoint_info(argparse.Namespace(path=args.out))


def _cmd_to_universal(args: argparse.Namespace) -> int:
    from default_moe import checkpoint

    try:
        out = checkpoint.to_universal(args.ckpt_dir, args.tag, args.output_tag)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {os.path.join(args.ckpt_dir, out)} (DeepSpeed's universal format with default_moe's expert and D files) "
        f'and pointed latest_universal at it; load with "checkpoint": {{"load_universal": true}} at any data-parallel size'
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from default_moe import export

    fmt = args.format
    if fmt == "auto":
        if os.path.exists(os.path.join(args.src, "config.json")):
            fmt = "hf"
        elif os.path.isdir(args.src):
            fmt = "main-job"
        else:
            print(f"error: {args.src}: not a save_pretrained folder nor a checkpoint directory", file=sys.stderr)
            return 2
    try:
        if fmt == "hf":
            check = export.export_hf_folder(args.src, args.dst, args.probe_text, args.accept_drift)
        else:
            if args.probe_text is not None:
                print(
                    "error: --probe-text is for HF models; the main job's export probes its own validation data", file=sys.stderr
                )
                return 2
            check = export.export_main_job(args.src, args.dst, args.tag, args.accept_drift)
    except export.DriftRefused as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(check.line())
    print(f"wrote {args.dst} ({fmt}: the plain top-k MoE, no default term, no D)")
    return 0


def _cmd_checkpoint_upgrade(args: argparse.Namespace) -> int:
    from default_moe import checkpoint

    if not args.trust_pickle:
        print(
            f"error: upgrading {args.old} unpickles it, which can run any code the file holds; pass "
            "--trust-pickle only for a file you wrote or trust",
            file=sys.stderr,
        )
        return 2
    if os.path.exists(args.new) and not args.force:
        print(f"error: {args.new} exists; pass --force to replace it", file=sys.stderr)
        return 2
    try:
        checkpoint.upgrade(args.old, args.new, trust_pickle=True)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.new}: data only (loads with weights_only=True)")
    return _cmd_checkpoint_info(argparse.Namespace(path=args.new))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="default-moe", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("routers", help="list the registered routers").set_defaults(fn=_cmd_routers)
    p = sub.add_parser("check-config", help="validate an MoE config JSON and print it with defaults filled in")
    p.add_argument("path")
    p.add_argument("--section", default=None, help='read this top-level key, e.g. "default_moe" of a DeepSpeed config')
    p.set_defaults(fn=_cmd_check_config)
    p = sub.add_parser("checkpoint-info", help="describe a default_moe.checkpoint file (layers, configs, layout)")
    p.add_argument("path")
    p.set_defaults(fn=_cmd_checkpoint_info)
    p = sub.add_parser(
        "convert-deepspeed", help="convert a DeepSpeed checkpoint (any ep_size) into a resharding checkpoint, offline"
    )
    p.add_argument("ckpt_dir", help="the directory given to engine.save_checkpoint")
    p.add_argument("out", help="the resharding checkpoint file to write")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the one in CKPT_DIR/latest)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load DeepSpeed's module file even if it holds objects DeepSpeed does not write (runs its code)",
    )
    p.set_defaults(fn=_cmd_convert_deepspeed)
    p = sub.add_parser("export", help="export a trained Default-MoE model to its plain top-k form for serving")
    p.add_argument("src", help="a save_pretrained folder of a converted HF model, or the main job's checkpoint directory")
    p.add_argument("dst", help="the folder to write (must not exist)")
    p.add_argument("--format", choices=["auto", "hf", "main-job"], default="auto", help="what SRC is (auto: by its files)")
    p.add_argument("--tag", default=None, help="main job: the checkpoint tag (default: the one latest names)")
    p.add_argument("--probe-text", default=None, help="HF: a text file whose tokens probe the drift (default: random ids)")
    p.add_argument(
        "--accept-drift",
        action="store_true",
        help="export a model trained with D in the forward although the plain model computes something else (measured)",
    )
    p.set_defaults(fn=_cmd_export)
    p = sub.add_parser(
        "to-universal",
        help="convert a DeepSpeed checkpoint of a default_moe run (ep_size 1) to DeepSpeed's universal format, offline",
    )
    p.add_argument("ckpt_dir", help="the directory given to engine.save_checkpoint")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the one latest names)")
    p.add_argument("--output-tag", default=None, help="the universal folder's name (default: TAG_universal)")
    p.set_defaults(fn=_cmd_to_universal)
    p = sub.add_parser("checkpoint-upgrade", help="rewrite an older (pickled-object) checkpoint you trust as data-only, once")
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--trust-pickle", action="store_true", help="required: unpickling OLD runs any code it holds")
    p.add_argument("--force", action="store_true", help="replace NEW if it exists")
    p.set_defaults(fn=_cmd_checkpoint_upgrade)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
