import WeftProto

/// Whether the chunk object with this id is on the disk with an intact header and its whole
/// length (SPEC.md §5, "Replay check of introduced objects").
public typealias ObjectCheck = (SliceID) -> Bool

extension MetaStore {
    /// How much of a journal lap the replay applies, and why it stops early.
    struct ReplayPlan: Equatable {
        /// Records to apply, from the first.
        var count: Int
        /// The first record not applied and the object it introduces that is not on the disk.
        var missing: (record: Int, id: SliceID)?

        static func == (a: ReplayPlan, b: ReplayPlan) -> Bool {
            a.count == b.count && a.missing?.record == b.missing?.record && a.missing?.id == b.missing?.id
        }
    }

    /// Plans the replay of `records` (a journal lap, in order) over `db` (RocksDB's files): every
    /// record before the first one that introduces a chunk object held here that `isPresent`
    /// says is not on the disk, unless the same record carries the object's bytes (`J`) or an
    /// applied record marks it garbage (`G`). Stopping earlier can drop the garbage record an
    /// exemption relied on, so the stop is computed again until it holds. Reads `db`, writes
    /// nothing.
    static func replayPlan(_ records: [UnsafeRawBufferPointer], db: RocksDB,
                           isPresent: ObjectCheck) throws -> ReplayPlan {
        var layouts: [[UInt8]: [UInt8]?] = [:]   // slice lists as the records before this one left them
        var garbageFrom: [SliceID: Int] = [:]    // the first record that marks each object garbage
        var present: [SliceID: Bool] = [:]
        var missing: [(record: Int, id: SliceID)] = []
        for (index, record) in records.enumerated() {
            let operations = try RocksDB.operations(ofSerialized: record)
            var journaled = Set<SliceID>()
            for operation in operations where operation.value != nil {
                if let id = Key.id(in: operation.key, tag: Key.journaledTag) { journaled.insert(id) }
                if let id = Key.id(in: operation.key, tag: Key.garbageTag), garbageFrom[id] == nil {
                    garbageFrom[id] = index
                }
            }
            for operation in operations where Key.isChunk(operation.key) {
                let before: [UInt8]?
                if let known = layouts[operation.key] { before = known } else { before = try db.get(operation.key) }
                layouts[operation.key] = .some(operation.value)
                guard let value = operation.value else { continue }
                let held = Set(before.map(localObjects) ?? [])
                for id in localObjects(value) where !held.contains(id) && !journaled.contains(id) {
                    let here: Bool
                    if let known = present[id] { here = known } else {
                        here = isPresent(id)
                        present[id] = here
                    }
                    if !here { missing.append((index, id)) }
                }
            }
        }
        var plan = ReplayPlan(count: records.count, missing: nil)
        while let first = missing.first(where: { candidate in
            candidate.record < plan.count && !(garbageFrom[candidate.id].map { $0 < plan.count } ?? false)
        }) {
            plan = ReplayPlan(count: first.record, missing: first)
        }
        return plan
    }

    /// Ids of the objects this hub holds (`hub` 0) in a stored slice list; none for a list that
    /// does not decode (fsck reports it).
    private static func localObjects(_ value: [UInt8]) -> [SliceID] {
        let slices = (try? value.withUnsafeBytes { try decodeSlices($0) }) ?? []
        return slices.filter { $0.hub == 0 }.map(\.id)
    }
}
