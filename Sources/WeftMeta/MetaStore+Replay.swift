import WeftProto

/// Whether the chunk object with this id is on the disk: false only when its file is absent
/// (SPEC.md §5, "Objects lost with unsynced commits").
public typealias ObjectCheck = (SliceID) -> Bool

extension MetaStore {
    /// The chunk objects held here (`hub` 0) that the journal record `record` adds to slice lists
    /// whose value in `db` (RocksDB with the lap's earlier records applied) lacks them, and that
    /// `isPresent` says are not on the disk. An object whose bytes the same record carries (`J`)
    /// is never missing: the hub writes it again at open. Reads `db`, writes nothing.
    static func missingObjects(introducedBy record: UnsafeRawBufferPointer, db: RocksDB,
                               isPresent: ObjectCheck) throws -> [SliceID] {
        let operations = try RocksDB.operations(ofSerialized: record)
        var journaled = Set<SliceID>()
        for operation in operations where operation.value != nil {
            if let id = Key.id(in: operation.key, tag: Key.journaledTag) { journaled.insert(id) }
        }
        var missing: [SliceID] = []
        for operation in operations where Key.isChunk(operation.key) {
            guard let value = operation.value else { continue }
            let held = Set(try db.get(operation.key).map(localObjects) ?? [])
            for id in localObjects(value) where !held.contains(id) && !journaled.contains(id) && !missing.contains(id) {
                if !isPresent(id) { missing.append(id) }
            }
        }
        return missing
    }

    /// Ids of the objects this hub holds (`hub` 0) in a stored slice list; none for a list that
    /// does not decode (fsck reports it).
    private static func localObjects(_ value: [UInt8]) -> [SliceID] {
        let slices = (try? value.withUnsafeBytes { try decodeSlices($0) }) ?? []
        return slices.filter { $0.hub == 0 }.map(\.id)
    }
}
