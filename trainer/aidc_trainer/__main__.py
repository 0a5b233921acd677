from aidc_trainer.launch import exit_process, main

exit_process(main())
