from samfit.cli import main

main()
