"""How bytes reach the client.

- :mod:`.ssh`: the SSH connection, resolved like ``ssh`` and with a strict host-key policy.
- :mod:`.remote`: the :class:`~.remote.Remote` protocol and the values it speaks.
- :mod:`.sftp_remote`, :mod:`.local_remote`: a remote root over SFTP, or a mounted directory.
- :mod:`.fetch`: the fetch engine both remotes share (job queue, callbacks on one thread).
- :mod:`.sftp_protocol`, :mod:`.sftp_ops`, :mod:`.sftp_pipeline`: SFTP v3 on the wire, its
  operations, and the engine that keeps many of them in flight on one channel.
- :mod:`.openssh_shortcuts`: every use of paramiko internals and of OpenSSH-only behaviour,
  behind one switch.
"""
