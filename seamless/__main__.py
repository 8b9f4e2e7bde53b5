from seamless.entry import main

main()
