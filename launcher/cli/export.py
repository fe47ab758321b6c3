"""`llaunch export CHECKPOINT --to DIR`: one Hugging Face model folder from any strategy's sharded checkpoint."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a Hugging Face model (safetensors) from a checkpoint",
                              description="Consolidate OUTPUT/checkpoints/step-N (DDP, FSDP or DeepSpeed ZeRO) "
                                          "into DIR/model.safetensors with its config and tokenizer.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a complete checkpoint folder, e.g. OUTPUT/checkpoints/step-200, "
                   "or a LoRA run's adapter folder OUTPUT/final (with --merge)")
    p.add_argument("--to", required=True, metavar="DIR", help="the folder to write the model to")
    p.add_argument("--merge", action="store_true", help="merge LoRA adapters into the base weights")
    p.set_defaults(run=run)


def run(args) -> int:
    import shutil
    from pathlib import Path

    from safetensors import SafetensorError

    from launcher.jobdir.checkpoint_store import MANIFEST
    from launcher.errors import LaunchError
    from launcher.train.adapters import is_adapter_dir, merge_adapter
    from launcher.train.export import export_checkpoint

    to = Path(args.to).expanduser().absolute()
    if to.exists() and not (to.is_dir() and not any(to.iterdir())):
        raise LaunchError(f"--to {to} already exists; export into a new (or empty) directory, llaunch never writes "
                          f"over one.")
    under = next((p for p in to.parents if p.exists()), None)
    if under is not None and not under.is_dir():
        raise LaunchError(f"--to {to} lies under the file {under}; choose another directory.")
    adapter_only = is_adapter_dir(args.checkpoint) and not (Path(args.checkpoint) / MANIFEST).exists()
    if adapter_only:  # a LoRA run's OUTPUT/final: the adapter alone, merged into the base it names
        check_adapter_base(Path(args.checkpoint), args.merge)
    # Written beside --to and renamed into place when complete: a failure leaves no half-exported model.
    partial = to.with_name(f".{to.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        if adapter_only:
            written = merge_adapter(args.checkpoint, partial) / "model.safetensors"
        else:
            written = export_checkpoint(args.checkpoint, partial, merge=args.merge, destination=to)
        if to.exists():
            to.rmdir()
        partial.rename(to)
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error
        raise LaunchError(f"could not write the model to {to} ({getattr(err, 'strerror', None) or err}); free "
                          f"space or fix permissions.") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"wrote {to / written.name}")
    return 0


def check_adapter_base(adapter, merge: bool) -> None:
    """An adapter folder exports only merged, and only onto the local base it names: a random-init base was
    never saved beside the adapter, only in the run's checkpoints, which export either way."""
    from launcher.errors import LaunchError
    from launcher.train.adapters import base_model_path
    from launcher.planning.models import pretrained_dir

    checkpoints = f"{adapter.absolute().parent}/checkpoints/step-N"
    if pretrained_dir(base_model_path(adapter)) is None:
        raise LaunchError(f"{adapter} holds only a LoRA adapter and its base model is not a local directory (a "
                          f"random-init base lives only in the run's checkpoints); export {checkpoints} instead, "
                          f"with or without --merge.")
    if not merge:
        raise LaunchError(f"{adapter} is already an adapter folder (`llaunch generate --model {adapter}` loads it); "
                          f"add --merge to fold it into its base, or export {checkpoints} for the adapter alone.")
