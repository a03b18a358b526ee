from .scores import main

main()
