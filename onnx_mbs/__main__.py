from onnx_mbs.console import main

raise SystemExit(main())
