"""`python -m launcher.train.prepare_data`: the data step that needs the tokenizers, run by the launcher before
any rank starts (launcher/jobdir/prepare.py), so that the launcher itself never loads torch.

It reads {"config": TrainConfig.to_dict(), "seq_len": S, "global_batch": B} on stdin and writes one JSON line
on stdout. Text: build the token cache (training the tokenizer if the run has none) and report its path; the
launcher reads the vocabulary and checks the blocks from the cache itself. SFT: tokenize and pack the records at
seq_len and check that they fill a global batch. A user's error is reported as {"error": SENTENCE} with exit
code 2, which the launcher says as its own one sentence; anything else ends with its traceback on stderr.
"""

from __future__ import annotations

import json
import sys

from launcher.config import TrainConfig
from launcher.errors import EXIT_USER_ERROR, LaunchError
from launcher.planning.models import pretrained_dir


def prepare_data(config: TrainConfig, seq_len: int | None, global_batch: int | None) -> dict:
    """Build the text token cache (reported as {"corpus": its path}), or tokenize and check the SFT records at
    seq_len against global_batch."""
    if config.data.dataset_format == "text":
        from launcher.train.data import build_corpus

        return {"corpus": str(build_corpus(config.data, pretrained_dir(config.model.name_or_path)).path)}
    from launcher.train.training_data import load_training_data

    load_training_data(config, seq_len).check(global_batch)
    return {}


def main() -> int:
    request = json.loads(sys.stdin.read())
    try:
        report = prepare_data(TrainConfig.from_dict(request["config"]), request["seq_len"], request["global_batch"])
    except LaunchError as err:
        report = {"error": str(err)}
    print(json.dumps(report))
    return EXIT_USER_ERROR if "error" in report else 0


if __name__ == "__main__":
    sys.exit(main())
