import sys

from climseg.bench import main

sys.exit(main())
