import sys

from mixtral_client._cli import main

sys.exit(main())
