from repconv.cli import main

main()
