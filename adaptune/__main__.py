from adaptune.cli import main

main()
