import sys

from loraflow.cli.main import main

sys.exit(main())
