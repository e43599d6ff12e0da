from agi_bitrix.cli import main

raise SystemExit(main())
