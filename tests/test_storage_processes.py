"""Object-store reads from forked worker processes (DataLoader workers) get their own
connections: every worker receives the bytes of the object it asked for."""
import torch
from torch.utils.data import DataLoader, Dataset


class _Objects(Dataset):
    def __init__(self, uris):
        self.uris = uris

    def __len__(self):
        return len(self.uris)

    def __getitem__(self, index):
        from kubeseg import storage

        data = storage.read_bytes(self.uris[index])
        return torch.tensor([index, int(data.decode().split(":")[0])])


def test_forked_workers_read_their_own_objects(bucket):
    from kubeseg import storage

    uris = [storage.join(bucket, "objects", f"{i:03d}.txt") for i in range(64)]
    for i, uri in enumerate(uris):
        storage.write_bytes(uri, f"{i}:".encode() + b"x" * (1000 + 37 * i))
    storage.read_bytes(uris[0])  # the parent holds pooled connections before the fork
    loader = DataLoader(_Objects(uris), batch_size=4, num_workers=2,
                        multiprocessing_context="fork")
    pairs = torch.cat(list(loader))
    assert pairs.shape == (64, 2)
    assert torch.equal(pairs[:, 0], pairs[:, 1]), "a worker received another object's body"
