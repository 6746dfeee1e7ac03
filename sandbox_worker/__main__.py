import sys

from wasmcore.sandbox_worker.worker import main

sys.exit(main())
