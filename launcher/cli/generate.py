"""`llaunch generate --model DIR --prompt TEXT`: continue a prompt with a trained (Hugging Face) model."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="continue a prompt with a trained model", description=__doc__)
    p.add_argument("--model", required=True, help="a model directory, e.g. runs/quickstart/final")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from launcher.errors import LaunchError

    model_dir = Path(args.model)
    if not (model_dir / "config.json").exists():
        raise LaunchError(f"{model_dir} is not a model directory (no config.json); pass e.g. DIR/final of a run.")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device).eval()
    inputs = tokenizer(args.prompt, return_tensors="pt").to(device)
    sampling = args.temperature > 0
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=args.max_new_tokens, do_sample=sampling,
            temperature=args.temperature if sampling else None, top_k=args.top_k if sampling else None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0
