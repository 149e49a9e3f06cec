from swarmoe.cli import main

main()
