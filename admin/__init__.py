"""The admin CLI (`braze-subs`) and its views (status). Imports dev tooling (demo,
simulator) only inside the commands that run them."""
