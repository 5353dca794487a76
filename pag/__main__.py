import sys

from pag.cli import main

sys.exit(main())
