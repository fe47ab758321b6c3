"""`llaunch generate --model DIR --prompt TEXT`: continue a prompt with a trained (Hugging Face) model."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="continue a prompt with a trained model", description=__doc__)
    p.add_argument("--model", required=True, help="a model directory, e.g. runs/quickstart/final")
    p.add_argument("--adapter", help="a LoRA/prefix adapter directory (e.g. DIR/final of a method: lora run) "
                   "applied on top of --model; a --model that is itself an adapter finds its base on its own")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--instruction", action="store_true",
                   help="wrap --prompt in the Alpaca template SFT trained on, and print only the answer")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def run(args) -> int:
    import math

    import torch

    from launcher.errors import LaunchError
    from launcher.train.adapters import load_for_generation

    if args.max_new_tokens < 1:
        raise LaunchError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}.")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise LaunchError(f"--temperature must be a finite number >= 0 (0 for greedy), not {args.temperature}.")
    if args.top_k < 0:
        raise LaunchError(f"--top-k must be >= 0 (0 keeps every token), not {args.top_k}.")
    if not args.prompt.strip():
        raise LaunchError("--prompt is empty; give the text to continue.")
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model, tokenizer = load_for_generation(args.model, args.adapter)
    except LaunchError:
        raise
    except Exception as err:  # transformers, safetensors and tokenizers each raise their own on a damaged file
        raise LaunchError(f"cannot load the model from {args.model} ({err.__class__.__name__}: "
                          f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else 'no detail'}); it is "
                          f"damaged or incomplete; pass another model directory, e.g. DIR/final of a run.") from None
    model = model.to(device)
    prompt = args.prompt
    if args.instruction:
        from launcher.train.sft import format_prompt

        prompt = format_prompt(args.prompt)
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    sampling = args.temperature > 0
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=args.max_new_tokens, do_sample=sampling,
            temperature=args.temperature if sampling else None, top_k=args.top_k if sampling else None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    start = inputs["input_ids"].shape[1] if args.instruction else 0
    print(tokenizer.decode(out[0][start:], skip_special_tokens=True))
    return 0
