"""How bytes reach the client: the SSH connection and its host-key policy, the pipelined
SFTP engine, and the two remotes (an SFTP server, a mounted directory) behind one protocol."""
