import sys

from aidc_trainer.launch import main

sys.exit(main())
