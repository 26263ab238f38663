from opscore.cli import main

main()
