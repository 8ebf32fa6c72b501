"""Writing and reading bytes safely: crash-safe directory commits, kernel copies, the one hashing
sweep, thread jobs and progress. Imports format only.
"""
