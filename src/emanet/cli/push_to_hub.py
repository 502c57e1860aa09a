"""`emanet push-to-hub`: upload a model folder, run or checkpoint to the Hugging Face Hub with its card."""

from __future__ import annotations

import argparse

from emanet.deploy.hub import push_to_hub
from emanet.errors import install_hint

EXAMPLE = """examples:
  emanet push-to-hub runs/voc me/emanet-voc              the run's newest checkpoint, with a model card
  emanet push-to-hub model/ me/emanet-voc --private --revision v1"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push-to-hub",
        help="upload a model folder, run or checkpoint to the Hugging Face Hub "
        f"with a generated model card ({install_hint('hub')}; log in with `hf auth login`)",
    )
    p.add_argument("source", help="a model folder, a checkpoint file or a run folder")
    p.add_argument("repo_id", help="user/name on the Hub (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", help="a branch to push to (default: main)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # a missing extra (HubNotInstalled) or the Hub's refusal (HubError) are user errors: a message, no traceback
    url = push_to_hub(args.source, args.repo_id, private=args.private, revision=args.revision)
    print(f"pushed: {url}")
    return 0
