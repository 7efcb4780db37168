import sys

from fedspeech.cli import main

sys.exit(main())
