import Foundation
import WeftProto

/// One mutation in progress: reads see its own writes; the batch and counters are applied
/// together by `MetaStore.mutate`, or dropped if it throws.
final class Transaction {
    unowned let store: MetaStore
    let batch = WriteBatch()
    var counters: Counters
    /// This transaction dropped chunk objects (they become garbage when it commits).
    private(set) var addsGarbage = false
    private var inodes: [InodeID: InodeRecord?] = [:]
    let now = currentTimeNs()

    init(store: MetaStore) {
        self.store = store
        counters = store.counters
    }

    var db: RocksDB { store.db }

    // MARK: inodes

    func inodeIfPresent(_ ino: InodeID) throws -> InodeRecord? {
        if let cached = inodes[ino] { return cached }
        let record = try db.get(Key.inode(ino)).map { bytes in try bytes.withUnsafeBytes { try InodeRecord.decode($0) } }
        inodes[ino] = record
        return record
    }

    func inode(_ ino: InodeID) throws -> InodeRecord {
        guard let record = try inodeIfPresent(ino) else { throw WeftError(ENOENT, "inode \(ino)") }
        return record
    }

    func put(_ record: InodeRecord) {
        precondition(record.attributes.ino != 0, "inode 0 is never stored")
        inodes[record.attributes.ino] = record
        batch.put(Key.inode(record.attributes.ino), record.encoded())
    }

    func directory(_ ino: InodeID) throws -> InodeRecord {
        let record = try inode(ino)
        guard record.attributes.isDirectory else { throw WeftError.notDirectory }
        return record
    }

    func allocateInode() throws -> InodeID {
        // Inode numbers leave the top 16 bits to the volume id on a global-root mount.
        guard counters.nextInode < MetaStore.idSpace else { throw WeftError(ENOSPC, "the volume has used all its inode numbers") }
        let ino = counters.nextInode
        counters.nextInode += 1
        counters.inodes += 1
        return ino
    }

    // MARK: entries

    func entry(_ parent: InodeID, _ name: [UInt8]) throws -> EntryValue? {
        guard let bytes = try db.get(Key.entry(parent, name)) else { return nil }
        return try bytes.withUnsafeBytes { try EntryValue.decode($0) }
    }

    func putEntry(_ parent: InodeID, _ name: [UInt8], _ value: EntryValue) {
        batch.put(Key.entry(parent, name), value.encoded())
    }

    func deleteEntry(_ parent: InodeID, _ name: [UInt8]) {
        batch.delete(Key.entry(parent, name))
    }

    func isEmptyDirectory(_ ino: InodeID) throws -> Bool {
        var empty = true
        try db.scan(prefix: Key.entryPrefix(ino)) { _, _ in
            empty = false
            return false
        }
        return empty
    }

    /// Marks a parent directory as changed (mtime and ctime).
    func touchDirectory(_ record: inout InodeRecord) {
        record.attributes.mtimeNs = now
        record.attributes.ctimeNs = now
    }

    // MARK: chunks

    func slices(_ ino: InodeID, _ index: UInt32) throws -> [Slice] {
        guard let bytes = try db.get(Key.chunk(ino, index)) else { return [] }
        return try bytes.withUnsafeBytes { try decodeSlices($0) }
    }

    func putSlices(_ ino: InodeID, _ index: UInt32, _ slices: [Slice]) {
        if slices.isEmpty { batch.delete(Key.chunk(ino, index)) } else { batch.put(Key.chunk(ino, index), encodeSlices(slices)) }
    }

    /// Chunk indexes of `ino` that have slice lists, in order.
    func chunkIndexes(_ ino: InodeID) throws -> [UInt32] {
        var indexes: [UInt32] = []
        try db.scan(prefix: Key.chunkPrefix(ino)) { key, _ in
            var r = ByteReader(UnsafeRawBufferPointer(rebasing: key[9...]))
            indexes.append(try r.u32BE())
            return true
        }
        return indexes
    }

    func discard(_ slices: [Slice]) {
        for slice in slices where slice.id != 0 {
            addsGarbage = true
            // The value names the hub holding the object when it is not this one (SPEC.md §12.5).
            batch.put(Key.garbage(slice.id), slice.hub == 0 ? [] : [UInt8(slice.hub >> 8), UInt8(slice.hub & 0xFF)])
        }
    }

    // MARK: removal

    /// Drops one link of `record`; reclaims it if no link and no open handle remain.
    func dropLink(_ record: inout InodeRecord) throws {
        record.attributes.nlink -= 1
        record.attributes.ctimeNs = now
        if record.attributes.nlink == 0 {
            if (store.openCounts[record.attributes.ino] ?? 0) > 0 {
                put(record)
                batch.put(Key.orphan(record.attributes.ino), [])
            } else {
                try reclaim(record)
            }
        } else {
            put(record)
        }
    }

    /// Deletes an inode with its chunks, xattrs and symlink target.
    func reclaim(_ record: InodeRecord) throws {
        let ino = record.attributes.ino
        for index in try chunkIndexes(ino) {
            discard(try slices(ino, index))
            batch.delete(Key.chunk(ino, index))
        }
        try db.scan(prefix: Key.xattrPrefix(ino)) { key, _ in
            batch.delete(Array(key))
            return true
        }
        if record.attributes.isSymlink { batch.delete(Key.symlink(ino)) }
        batch.delete(Key.inode(ino))
        inodes[ino] = .some(nil)
        counters.inodes -= 1
        if record.attributes.isRegular { counters.logicalBytes -= min(counters.logicalBytes, record.attributes.size) }
    }

    func dropOpen(_ ino: InodeID, count: Int) throws {
        let remaining = (store.openCounts[ino] ?? 0) - count
        if remaining > 0 {
            store.openCounts[ino] = remaining
            return
        }
        store.openCounts[ino] = nil
        if let record = try inodeIfPresent(ino), record.attributes.nlink == 0 {
            batch.delete(Key.orphan(ino))
            try reclaim(record)
        }
    }
}
