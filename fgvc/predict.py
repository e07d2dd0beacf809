"""Predict the classes of image files with a trained checkpoint: top-k names and probabilities, as text or JSON.

    python -m fgvc.predict --checkpoint runs/<run>/best.pt photo.jpg more_photos/ [--topk 5] [--json]

Folders are searched recursively for image files. The probabilities are the softmax of exactly the logits that
`python -m fgvc.evaluate` scores (single crop, the run's evaluation preprocessing). An unreadable file is reported
with its reason and the rest are still predicted; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fgvc.build import load_model
from fgvc.engine.inference import image_files, predict_files
from fgvc.engine.logging import dumps
from fgvc.errors import command


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fgvc.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    if args.topk < 1 or args.batch_size < 1:
        parser.error("--topk and --batch-size must be at least 1")
    trained = load_model(args.checkpoint, device=args.device)
    files = image_files(args.inputs, echo_skipped=lambda message: print(message, file=sys.stderr))
    predictions = predict_files(trained, files, topk=args.topk, batch_size=args.batch_size)
    if args.json:
        print(dumps([p.to_json() for p in predictions], indent=2))
    for prediction in predictions:
        if prediction.error is not None:
            print(f"{prediction.path}: unreadable: {prediction.error}", file=sys.stderr)
        elif not args.json:
            print(prediction.path)
            for rank, (name, probability) in enumerate(zip(prediction.classes, prediction.probabilities,
                                                           strict=True), start=1):
                print(f"  {rank}. {name}  {100 * probability:.1f}%")
    return 1 if any(p.error is not None for p in predictions) else 0


if __name__ == "__main__":
    sys.exit(main())
