from admin.launcher import main

main()
