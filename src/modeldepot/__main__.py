from modeldepot.launch import main

main()
