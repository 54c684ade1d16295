import WeftProto
#if canImport(Glibc)
import Glibc
#endif

extension MetaStore {
    /// Reserves `count` never-reused slice ids, durably (a crash never hands an id out twice).
    public func allocateSliceIDs(count: UInt32) throws -> SliceID {
        guard count > 0 && count <= 1 << 20 else { throw WeftError.invalid }
        return try mutate { t in
            let first = t.counters.nextSlice
            // Slice ids stay in the volume's own range (its top 16 bits name the volume).
            let rangeEnd = ((first >> 48) << 48) + MetaStore.idSpace
            guard rangeEnd - first > UInt64(count) else { throw WeftError(ENOSPC, "the volume has used all its slice ids") }
            t.counters.nextSlice += UInt64(count)
            return first
        }
    }

    public func layout(ino: InodeID, firstChunk: UInt32, count: UInt32) throws -> (Attributes, [[Slice]]) {
        try read { t in
            let record = try t.inode(ino)
            guard record.attributes.isRegular else { throw WeftError.invalid }
            let count = min(count, 1024)
            var lists: [[Slice]] = []
            lists.reserveCapacity(Int(count))
            for index in 0..<count { lists.append(try t.slices(ino, firstChunk &+ index)) }
            return (record.attributes, lists)
        }
    }

    /// Appends committed slices and raises the size; see `HubAPI.commitSlices`.
    /// `journaled`: raw bytes of objects of this commit whose durability the journal record
    /// carries (SPEC.md §5, "Small objects in the journal"), stored under `J` keys in the
    /// commit's batch.
    public func commitSlices(ino: InodeID, slices: [SliceCommit], minimumSize: UInt64, durable: Bool,
                             journaled: [(id: SliceID, bytes: [UInt8])] = []) throws -> Attributes {
        let chunkSize = volume.chunkSizeBytes
        for commit in slices {
            let s = commit.slice
            guard s.id != 0, s.length > 0,
                  UInt64(s.offsetInChunk) + UInt64(s.length) <= UInt64(chunkSize),
                  UInt64(s.sliceOffset) + UInt64(s.length) <= UInt64(s.objectLength) else {
                throw WeftError(EINVAL, "slice \(s.id) out of bounds")
            }
        }
        if minimumSize > Limits.fileSizeMaxBytes { throw WeftError.fileTooBig }
        let committed: Attributes? = try mutate(durable: durable) { t in
            guard var record = try t.inodeIfPresent(ino) else {
                // The file is gone: its new slices are garbage (recorded, then ESTALE below).
                t.discard(slices.map(\.slice))
                return nil
            }
            guard record.attributes.isRegular else { throw WeftError.invalid }
            for object in journaled { t.batch.put(Key.journaled(object.id), object.bytes) }
            var byChunk: [UInt32: [Slice]] = [:]
            var order: [UInt32] = []
            for commit in slices {
                if byChunk[commit.chunkIndex] == nil { order.append(commit.chunkIndex) }
                byChunk[commit.chunkIndex, default: []].append(commit.slice)
            }
            for index in order {
                var list = try t.slices(ino, index)
                list.append(contentsOf: byChunk[index]!)
                t.putSlices(ino, index, Self.dropShadowed(list, t: t))
            }
            let oldSize = record.attributes.size
            if minimumSize > oldSize {
                record.attributes.size = minimumSize
                t.counters.logicalBytes += minimumSize - oldSize
            }
            record.attributes.allocatedBytes += slices.reduce(0) { $0 + UInt64($1.slice.length) }
            record.attributes.mtimeNs = t.now
            record.attributes.ctimeNs = t.now
            record.attributes.dataVersion += 1
            t.put(record)
            return record.attributes
        }
        guard let committed else { throw WeftError(ESTALE, "inode \(ino) was removed") }
        return committed
    }

    /// Removes slices that later slices cover completely, sending them to garbage.
    static func dropShadowed(_ list: [Slice], t: Transaction) -> [Slice] {
        guard list.count > 1 else { return list }
        var kept: [Slice] = []
        var dropped: [Slice] = []
        for (position, slice) in list.enumerated() {
            let start = slice.offsetInChunk, end = slice.offsetInChunk + slice.length
            let covered = list[(position + 1)...].contains { later in
                later.offsetInChunk <= start && later.offsetInChunk + later.length >= end
            }
            if covered { dropped.append(slice) } else { kept.append(slice) }
        }
        // A slice id may appear several times after a trim; only discard ids no kept slice uses.
        let keptIDs = Set(kept.map(\.id))
        t.discard(dropped.filter { !keptIDs.contains($0.id) })
        return kept
    }

    /// Replaces the first `replacedCount` slices of a chunk with `replacement` if the list still
    /// starts with exactly `expectedPrefix` (compaction). Returns false if the list changed meanwhile.
    public func replaceSlices(ino: InodeID, chunkIndex: UInt32, expectedPrefix: [Slice], replacement: Slice) throws -> Bool {
        try mutate(durable: false) { t in
            guard try t.inodeIfPresent(ino) != nil else { return false }
            let list = try t.slices(ino, chunkIndex)
            guard list.count >= expectedPrefix.count, Array(list.prefix(expectedPrefix.count)) == expectedPrefix else {
                return false
            }
            let rest = Array(list.dropFirst(expectedPrefix.count))
            let restIDs = Set(rest.map(\.id))
            t.discard(expectedPrefix.filter { !restIDs.contains($0.id) })
            t.putSlices(ino, chunkIndex, [replacement] + rest)
            return true
        }
    }

    /// Ids of chunk objects that no file references any more and whose removal is durable.
    public func takeGarbage(limit: Int) throws -> [SliceID] {
        try garbage(after: 0, limit: limit).map(\.id)
    }

    /// Chunk objects that no file references any more and whose removal is durable, in id
    /// order from the first id above `after`, with the hub that holds each (0 = this one).
    public func garbage(after: SliceID, limit: Int) throws -> [GarbageObject] {
        var found: [GarbageObject] = []
        try db.scan(prefix: [Key.garbageTag], from: Key.garbage(after &+ 1)) { key, value in
            var r = ByteReader(UnsafeRawBufferPointer(rebasing: key[1...]))
            let id = try r.u64BE()
            let holder = value.count == 2 ? UInt16(value[0]) << 8 | UInt16(value[1]) : 0
            found.append(GarbageObject(id: id, holder: holder))
            return found.count < limit
        }
        // The changes that dropped these objects' last references must be durable before the
        // objects go. Synced only when there is garbage: the hub looks after every release and
        // unlink, and a sync each time would undo periodic durability.
        if !found.isEmpty { try sync() }
        return found
    }

    /// Forgets garbage entries whose chunk objects have been deleted.
    public func forgetGarbage(_ ids: [SliceID]) throws {
        try mutate(durable: false) { t in
            for id in ids {
                t.batch.delete(Key.garbage(id))
                t.batch.delete(Key.journaled(id))
            }
        }
    }

    // MARK: Objects the journal carries (SPEC.md §5, "Small objects in the journal")

    /// Every object whose bytes a `J` key holds, with whether it is garbage (`G`).
    public func journaledObjects() throws -> [(id: SliceID, bytes: [UInt8], isGarbage: Bool)] {
        var found: [(id: SliceID, bytes: [UInt8])] = []
        try db.scan(prefix: [Key.journaledTag]) { key, value in
            var r = ByteReader(UnsafeRawBufferPointer(rebasing: key[1...]))
            found.append((try r.u64BE(), Array(value)))
            return true
        }
        return try found.map { ($0.id, $0.bytes, try db.get(Key.garbage($0.id)) != nil) }
    }

    /// Deletes the `J` keys of `ids`, whose objects are now durable themselves. Not synced: a
    /// key a crash brings back is checked again at the next open.
    public func forgetJournaled(_ ids: [SliceID], durable: Bool = false) throws {
        guard !ids.isEmpty else { return }
        try mutate(durable: durable) { t in
            for id in ids { t.batch.delete(Key.journaled(id)) }
        }
    }
}

/// A chunk object to delete, and the hub that holds it (0 = the volume's home).
public struct GarbageObject: Equatable, Sendable {
    public var id: SliceID
    public var holder: UInt16
    public init(id: SliceID, holder: UInt16) {
        self.id = id
        self.holder = holder
    }
}

extension Transaction {
    /// Sets the size of a regular file, trimming or dropping slices past the new end.
    func truncate(_ record: inout InodeRecord, to size: UInt64) throws {
        let ino = record.attributes.ino
        let oldSize = record.attributes.size
        if size < oldSize {
            let chunkSize = UInt64(store.volume.chunkSizeBytes)
            let boundaryIndex = UInt32(size / chunkSize)
            let cut = UInt32(size % chunkSize)
            for index in try chunkIndexes(ino) where index >= boundaryIndex {
                let list = try slices(ino, index)
                if index > boundaryIndex || cut == 0 {
                    discard(list)
                    putSlices(ino, index, [])
                    continue
                }
                var kept: [Slice] = []
                for var slice in list {
                    if slice.offsetInChunk >= cut { continue }
                    if slice.offsetInChunk + slice.length > cut { slice.length = cut - slice.offsetInChunk }
                    kept.append(slice)
                }
                let keptIDs = Set(kept.map(\.id))
                discard(list.filter { !keptIDs.contains($0.id) })
                putSlices(ino, index, kept)
            }
            counters.logicalBytes -= min(counters.logicalBytes, oldSize - size)
        } else {
            counters.logicalBytes += size - oldSize
        }
        record.attributes.size = size
        record.attributes.allocatedBytes = min(record.attributes.allocatedBytes, size)
        record.attributes.mtimeNs = now
        record.attributes.dataVersion += 1
    }
}
