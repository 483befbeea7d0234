from quailora_cli.main import main

main()
