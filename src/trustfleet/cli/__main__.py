from trustfleet.cli.main import main

main()
