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
    from launcher.train.adapters import is_adapter_dir, merge_adapter
    from launcher.train.export import export_checkpoint

    if is_adapter_dir(args.checkpoint):  # a LoRA run's OUTPUT/final: the adapter alone, on its recorded base
        from launcher.errors import LaunchError

        if not args.merge:
            raise LaunchError(f"{args.checkpoint} is already an adapter folder; add --merge to fold it into its base.")
        path = merge_adapter(args.checkpoint, args.to) / "model.safetensors"
    else:
        path = export_checkpoint(args.checkpoint, args.to, merge=args.merge)
    print(f"wrote {path}")
    return 0
