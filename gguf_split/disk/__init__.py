"""Writing and reading bytes safely: crash-safe directory commits, kernel copies, the one hashing
sweep and what it yields per file (manifests), thread jobs and progress. Imports format only.
"""
