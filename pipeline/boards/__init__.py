"""The user's boards: named devices, OpenSSH sessions, the remote helper, deploy and merge."""
