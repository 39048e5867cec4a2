from onnx_mbs.cli import main

raise SystemExit(main())
