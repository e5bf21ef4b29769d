import sys

from raylign.cluster.cli import main

sys.exit(main())
