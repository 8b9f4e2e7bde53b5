from seamless.cli import main

main()
