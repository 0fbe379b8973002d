"""``virt-bitmapd inspect IMAGE``: an image's chain, its bitmaps and their validity."""

from __future__ import annotations

import argparse
import json

from .. import images, printing
from ..errors import ImageInUse
from . import EXIT_OK


def main(args: argparse.Namespace) -> int:
    open_elsewhere = False
    try:
        chain = images.read_chain(args.image)
    except ImageInUse:
        chain = images.read_chain(args.image, force_share=True)
        open_elsewhere = True
    if args.json:
        print(json.dumps(printing.chain_json(chain, open_elsewhere=open_elsewhere), indent=2))
    else:
        print(printing.chain_text(chain, open_elsewhere=open_elsewhere))
    return EXIT_OK
