import sys

from sae_lens_lite.cli import main

sys.exit(main())
