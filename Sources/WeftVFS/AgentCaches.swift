import WeftProto

// Bookkeeping of the agent's lease caches (SPEC.md §12.6): own name changes under way, the
// closed files kept, and the queue they use. Moved out of VFS.swift unchanged.

/// This agent's own unlinks and renames under way, by the names they change, and whether two of
/// them overlapped on a same name. Guarded by the VFS lock.
struct NamesChanging {
    private var byName: [NameKey: [UInt64]] = [:]
    /// Changes under way: true once another one of a same name overlapped it.
    private var overlapped: [UInt64: Bool] = [:]
    private var nextID: UInt64 = 0

    /// Registers a change of `keys`; returns its id for `end`.
    mutating func begin(_ keys: [NameKey]) -> UInt64 {
        nextID &+= 1
        var clash = false
        for key in Set(keys) {
            if let others = byName[key] {
                clash = true
                for other in others { overlapped[other] = true }
            }
            byName[key, default: []].append(nextID)
        }
        overlapped[nextID] = clash
        return nextID
    }

    /// Ends change `id` of `keys`; returns true if no other change of one of its names
    /// overlapped it.
    mutating func end(_ id: UInt64, _ keys: [NameKey]) -> Bool {
        let clash = overlapped.removeValue(forKey: id) ?? true
        for key in Set(keys) {
            guard let ids = byName[key] else { continue }
            let rest = ids.filter { $0 != id }
            byName[key] = rest.isEmpty ? nil : rest
        }
        return !clash
    }

    var isEmpty: Bool { overlapped.isEmpty && byName.isEmpty }
}

/// Closed files kept under their leases, in the order of their last close. Guarded by the VFS
/// lock. A file closed again moves to the back: its older entry stays in the queue but no
/// longer matches the file's `keptSerial`, so it is skipped (and not counted) when it comes up,
/// and dropped by a compaction once stale entries outnumber live ones.
struct KeptFiles {
    private var order = FIFO<(file: OpenFile, serial: UInt64)>()
    private var serial: UInt64 = 0
    /// Files with a live entry.
    private(set) var count = 0

    /// `file` was closed and is kept: it becomes the most recently kept.
    mutating func keep(_ file: OpenFile) {
        if file.keptSerial == 0 { count += 1 }
        serial += 1
        file.keptSerial = serial
        order.append((file, serial))
        if order.count > 2 * count + 1024 {
            order.removeAll { $0.file.keptSerial != $0.serial }
        }
    }

    /// `file` leaves the kept files other than by eviction.
    mutating func forget(_ file: OpenFile) {
        guard file.keptSerial != 0 else { return }
        file.keptSerial = 0
        count -= 1
    }

    /// Takes the least recently kept files off while more than `max` are kept; the caller
    /// forgets those that are not open again.
    mutating func evict(beyond max: Int) -> [OpenFile] {
        var evicted: [OpenFile] = []
        while count > max, let (file, serial) = order.popFirst() {
            guard file.keptSerial == serial else { continue }
            file.keptSerial = 0
            count -= 1
            evicted.append(file)
        }
        return evicted
    }

    /// The file whose close is `distance` entries before the newest, if that entry is its last
    /// close (stale entries count too, so this is about, not exactly, the distance in files).
    func kept(before distance: Int) -> OpenFile? {
        guard let (file, serial) = order.fromEnd(distance), file.keptSerial == serial else { return nil }
        return file
    }
}

/// A first-in, first-out queue with O(1) append and removal at the front (an array and the
/// index of its first live element, compacted when half of it is dead).
struct FIFO<Element> {
    private var storage: [Element] = []
    private var head = 0

    var count: Int { storage.count - head }

    mutating func append(_ element: Element) { storage.append(element) }

    mutating func popFirst() -> Element? {
        guard head < storage.count else { return nil }
        let first = storage[head]
        head += 1
        if head >= 1024 && head * 2 >= storage.count {
            storage.removeFirst(head)
            head = 0
        }
        return first
    }

    /// Keeps only the elements `shouldRemove` is false for, in order.
    mutating func removeAll(where shouldRemove: (Element) -> Bool) {
        storage.removeFirst(head)
        head = 0
        storage.removeAll(where: shouldRemove)
    }

    /// The element `distance` places before the last (0: the last one), if there is one.
    func fromEnd(_ distance: Int) -> Element? {
        let index = storage.count - 1 - distance
        return index >= head && distance >= 0 ? storage[index] : nil
    }
}

/// The name under which a lookup last gave each file to the kernel, whether a lease covered the
/// reply, and when (SPEC.md §12.6, "A rename across another agent's rename"). A kernel
/// operation that holds a directory's lock (a rename) uses the entries it looked up even if
/// the home moves a file meanwhile, and takes two names that it found on one file for the same
/// file: a lookup that finds a file under another name than the one recorded asks whether the
/// kernel may still hold that other entry. Guarded by `VFS.givenLock`.
struct GivenNames {
    struct Given: Equatable {
        var key: NameKey
        /// A lease covered the reply, or the kernel has dropped the entry since.
        var covered: Bool
        var ns: UInt64
    }

    private var byFile: [InodeID: Given] = [:]
    /// The file each recorded entry names (the other way round), for this agent's own renames.
    private var byKey: [NameKey: InodeID] = [:]
    static let filesMax = 65_536

    var count: Int { byFile.count }

    /// The record of `ino` when it names another entry than `key`.
    func other(_ ino: InodeID, than key: NameKey) -> Given? {
        guard let given = byFile[ino], given.key != key else { return nil }
        return given
    }

    /// The record of `ino` when it names another entry than `key`; otherwise records that the
    /// kernel got entry `key` for it and returns nil (one pass for the common case of a lookup).
    mutating func otherOrGave(_ ino: InodeID, _ key: NameKey, covered: Bool, now: UInt64) -> Given? {
        if let given = other(ino, than: key) { return given }
        gave(ino, key, covered: covered, now: now)
        return nil
    }

    /// The kernel got entry `key` for file `ino`. `keepingEarlier`: the file keeps the entry it
    /// had too (a hard link), and the earlier record stays.
    mutating func gave(_ ino: InodeID, _ key: NameKey, covered: Bool, now: UInt64, keepingEarlier: Bool = false) {
        if let earlier = byFile[ino] {
            if keepingEarlier && earlier.key != key { return }
            if earlier.key == key && earlier.covered && covered { return }   // nothing new
            if byKey[earlier.key] == ino { byKey[earlier.key] = nil }
        } else if byFile.count >= Self.filesMax {
            byFile.removeAll(keepingCapacity: true)
            byKey.removeAll(keepingCapacity: true)
        }
        byFile[ino] = Given(key: key, covered: covered, ns: now)
        byKey[key] = ino
    }

    /// This agent's own rename moved entry `from` to `to` (the kernel moves its entry itself);
    /// an exchange swaps the two.
    mutating func renamed(_ from: NameKey, _ to: NameKey, exchange: Bool) {
        let moved = byKey.removeValue(forKey: from)
        let other = byKey.removeValue(forKey: to)
        if let moved, byFile[moved]?.key == from {
            byFile[moved]?.key = to
            byKey[to] = moved
        }
        if exchange, let other, byFile[other]?.key == to {
            byFile[other]?.key = from
            byKey[from] = other
        }
    }

    /// The kernel dropped entry `key`: if it is still what `ino` was last given under, it can
    /// no longer be held stale.
    mutating func dropped(_ ino: InodeID, _ key: NameKey) {
        if byFile[ino]?.key == key { byFile[ino]?.covered = true }
    }
}

/// The lookups this agent answered ESTALE, by the thread that asked, with the record of the
/// entry the kernel might hold stale (SPEC.md §12.6, "The kernel's retry"). When a call's
/// lookup fails with ESTALE the kernel starts the call again with `LOOKUP_REVAL`: every entry
/// on the call's path is looked up at the file system again, the one that may be stale
/// included, so that attempt cannot use it, and a second ESTALE for it would only reach the
/// caller. That retry is told apart by its thread, and by its first lookup being of another
/// name than the one answered ESTALE, within `beginNs`: it walks the path again from its first
/// directory. (After an ESTALE answered to the revalidation of an entry the kernel holds, the
/// same call looks the same name up at once: that lookup is still the first attempt.) The
/// retry lasts up to its lookup of the name answered ESTALE, its first failed lookup, or
/// `windowNs`. Guarded by `VFS.givenLock`.
struct StaleRetries {
    static let beginNs: UInt64 = 50_000_000
    static let windowNs: UInt64 = 1_000_000_000
    static let callersMax = 1_024

    private struct Answered {
        var key: NameKey
        var stale: GivenNames.Given
        var ns: UInt64
        /// A lookup of another name came: the kernel's retry is under way.
        var retrying = false
    }

    private var byCaller: [Int32: Answered] = [:]
    private var prunedNs: UInt64 = 0

    var count: Int { byCaller.count }

    /// If thread `caller`'s lookup of `key` belongs to the kernel's retry of a call whose lookup
    /// this agent answered ESTALE, the record of the entry that was held stale then: that
    /// retry looks it up again before it uses it.
    mutating func retry(_ caller: Int32, _ key: NameKey, now: UInt64) -> GivenNames.Given? {
        guard let answered = byCaller[caller] else {
            if now &- prunedNs > Self.windowNs { prune(now: now) }
            return nil
        }
        let age = now >= answered.ns ? now - answered.ns : 0
        if age > Self.windowNs || answered.key == key || (!answered.retrying && age > Self.beginNs) {
            byCaller[caller] = nil
            return answered.retrying && age <= Self.windowNs ? answered.stale : nil
        }
        byCaller[caller]?.retrying = true
        return answered.stale
    }

    /// This agent answers thread `caller`'s lookup of `key` ESTALE because of entry `stale`.
    mutating func answered(_ caller: Int32, _ key: NameKey, stale: GivenNames.Given, now: UInt64) {
        if byCaller.count >= Self.callersMax {
            prune(now: now)
            if byCaller.count >= Self.callersMax { byCaller.removeAll(keepingCapacity: true) }
        }
        byCaller[caller] = Answered(key: key, stale: stale, ns: now)
    }

    /// Thread `caller`'s call ended (a lookup of its retry failed).
    mutating func remove(_ caller: Int32) {
        byCaller[caller] = nil
    }

    /// Forgets the records of threads that never came back (their calls ended otherwise).
    private mutating func prune(now: UInt64) {
        byCaller = byCaller.filter { now < $0.value.ns || now - $0.value.ns <= Self.windowNs }
        prunedNs = now
    }
}
