"""`llaunch export CHECKPOINT --to DIR`: one Hugging Face model folder from any strategy's sharded checkpoint."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a Hugging Face model (safetensors) from a checkpoint",
                              description="Consolidate OUTPUT/checkpoints/step-N (DDP, FSDP or DeepSpeed ZeRO) "
                                          "into DIR/model.safetensors with its config and tokenizer.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a complete checkpoint folder, e.g. OUTPUT/checkpoints/step-200")
    p.add_argument("--to", required=True, metavar="DIR", help="the folder to write the model to")
    p.add_argument("--merge", action="store_true", help="merge LoRA adapters into the base weights")
    p.set_defaults(run=run)


def run(args) -> int:
    from launcher.train.export import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.to, merge=args.merge)
    print(f"wrote {path}")
    return 0
