import WeftProto
#if canImport(Glibc)
import Glibc
#endif

/// What the metadata check found, and the chunk objects the metadata references.
public struct MetadataCheck {
    public var inodes: UInt64 = 0
    public var problems: [String] = []
    public var repaired: [String] = []
    /// The problems a repair leaves in place (also in `problems`): a directory whose record
    /// names another parent than its entry's, a slice that exceeds its chunk.
    public var unrepairable: [String] = []
    /// Referenced chunk object id -> the object length the layouts expect (objects the home
    /// holds: slices with `hub` 0).
    public var referencedSlices: [SliceID: UInt32] = [:]
    /// Chunk objects queued for deletion.
    public var garbage: Set<SliceID> = []
}

extension MetaStore {
    /// Checks references between entries, inodes and layouts, link counts and counters.
    /// With `repair`, removes dangling entries and layouts and fixes link counts and counters;
    /// what it cannot fix is also in `unrepairable`.
    public func checkMetadata(repair: Bool) throws -> MetadataCheck {
        var check = MetadataCheck()
        var records: [InodeID: InodeRecord] = [:]
        try db.scan(prefix: [Key.inodeTag]) { _, value in
            let record = try InodeRecord.decode(value)
            records[record.attributes.ino] = record
            return true
        }
        check.inodes = UInt64(records.count)
        var orphans: Set<InodeID> = []
        try db.scan(prefix: [Key.orphanTag]) { key, _ in
            var r = ByteReader(UnsafeRawBufferPointer(rebasing: key[1...]))
            orphans.insert(try r.u64BE())
            return true
        }
        var links: [InodeID: UInt32] = [:]
        var subdirectories: [InodeID: UInt32] = [:]
        var danglingEntries: [(InodeID, [UInt8])] = []
        try db.scan(prefix: [Key.entryTag]) { key, value in
            var r = ByteReader(key)
            _ = try r.u8()
            let parent = try r.u64BE()
            let name = Array(key[9...])
            let entry = try EntryValue.decode(value)
            guard let child = records[entry.ino] else {
                check.problems.append("entry '\(String(decoding: name, as: UTF8.self))' in directory \(parent) points to missing inode \(entry.ino)")
                danglingEntries.append((parent, name))
                return true
            }
            if records[parent]?.attributes.isDirectory != true {
                check.problems.append("entry '\(String(decoding: name, as: UTF8.self))' lives in non-directory \(parent)")
                danglingEntries.append((parent, name))
                return true
            }
            links[entry.ino, default: 0] += 1
            if child.attributes.isDirectory {
                subdirectories[parent, default: 0] += 1
                if child.parent != parent {
                    check.unrepairable.append("directory \(entry.ino) records parent \(child.parent), entry is in \(parent)")
                }
            }
            return true
        }
        var fixes: [InodeRecord] = []
        var unreachable: [InodeRecord] = []
        var logicalBytes: UInt64 = 0
        for (ino, record) in records {
            let attributes = record.attributes
            if attributes.isRegular { logicalBytes += attributes.size }
            let expected: UInt32
            if attributes.isDirectory {
                expected = 2 + (subdirectories[ino] ?? 0)
                if ino != InodeNumbers.root && links[ino] == nil {
                    check.problems.append("directory \(ino) is not reachable")
                    unreachable.append(record)
                    continue
                }
            } else {
                expected = links[ino] ?? 0
                if expected == 0 && !orphans.contains(ino) {
                    check.problems.append("inode \(ino) has no name and is not open")
                    unreachable.append(record)
                    continue
                }
            }
            if attributes.nlink != expected {
                check.problems.append("inode \(ino) has nlink \(attributes.nlink), expected \(expected)")
                var fixed = record
                fixed.attributes.nlink = expected
                fixes.append(fixed)
            }
        }
        var danglingLayouts: [(InodeID, UInt32, [Slice])] = []
        try db.scan(prefix: [Key.chunkTag]) { key, value in
            var r = ByteReader(key)
            _ = try r.u8()
            let ino = try r.u64BE(), index = try r.u32BE()
            let slices = try decodeSlices(value)
            guard let record = records[ino], record.attributes.isRegular else {
                check.problems.append("chunk list \(index) of missing inode \(ino)")
                danglingLayouts.append((ino, index, slices))
                return true
            }
            for slice in slices where slice.id != 0 {
                if UInt64(slice.offsetInChunk) + UInt64(slice.length) > UInt64(volume.chunkSizeBytes) {
                    check.unrepairable.append("slice \(slice.id) of inode \(ino) exceeds its chunk")
                }
                // Objects another hub holds (SPEC.md §12.5) are that hub's to check.
                if slice.hub == 0 { check.referencedSlices[slice.id] = slice.objectLength }
            }
            return true
        }
        try db.scan(prefix: [Key.garbageTag]) { key, _ in
            var r = ByteReader(UnsafeRawBufferPointer(rebasing: key[1...]))
            check.garbage.insert(try r.u64BE())
            return true
        }
        check.problems += check.unrepairable
        let counted = counters
        if counted.inodes != UInt64(records.count) {
            check.problems.append("inode counter \(counted.inodes), found \(records.count)")
        }
        if repair && check.problems.count > check.unrepairable.count {
            try mutate { t in
                for (parent, name) in danglingEntries { t.deleteEntry(parent, name) }
                for record in fixes { t.put(record) }
                for record in unreachable { try t.reclaim(record) }
                for (ino, index, slices) in danglingLayouts {
                    t.discard(slices)
                    t.batch.delete(Key.chunk(ino, index))
                }
                t.counters.inodes = UInt64(records.count - unreachable.count)
                t.counters.logicalBytes = logicalBytes
            }
            check.repaired.append("fixed \(danglingEntries.count) entries, \(fixes.count) link counts, "
                                  + "\(unreachable.count) unreachable inodes, \(danglingLayouts.count) layouts, counters")
        }
        return check
    }

    /// Removes every reference to the given chunk objects (their data is lost; reads give zeros).
    public func dropSliceReferences(_ ids: Set<SliceID>) throws {
        let affected = try Self.chunksReferencing(ids, in: db)
        guard !affected.isEmpty else { return }
        try mutate { t in
            // The scan ran without the engine's lock: each list is read again under it, so a
            // change that landed since (a commit to the same chunk) is kept, not overwritten.
            for (ino, index, _) in affected {
                let current = try t.slices(ino, index)
                let kept = current.filter { !ids.contains($0.id) }
                if kept.count != current.count { t.putSlices(ino, index, kept) }
            }
        }
    }

    /// Those of `ids` that some chunk's slice list references now (a scan of every chunk key).
    public func referenced(among ids: Set<SliceID>) throws -> Set<SliceID> {
        var found: Set<SliceID> = []
        for (_, _, slices) in try Self.chunksReferencing(ids, in: db) {
            for slice in slices where ids.contains(slice.id) { found.insert(slice.id) }
        }
        return found
    }

    /// Every chunk in `db` whose slice list references one of `ids`, with that list (a scan of
    /// every chunk key).
    static func chunksReferencing(_ ids: Set<SliceID>, in db: RocksDB) throws -> [(InodeID, UInt32, [Slice])] {
        guard !ids.isEmpty else { return [] }
        var affected: [(InodeID, UInt32, [Slice])] = []
        try db.scan(prefix: [Key.chunkTag]) { key, value in
            var r = ByteReader(key)
            _ = try r.u8()
            let ino = try r.u64BE(), index = try r.u32BE()
            let slices = try decodeSlices(value)
            if slices.contains(where: { ids.contains($0.id) }) { affected.append((ino, index, slices)) }
            return true
        }
        return affected
    }
}
