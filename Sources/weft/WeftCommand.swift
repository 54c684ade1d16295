import ArgumentParser
import Foundation
import WeftAgent
import WeftHub
import WeftMeta
import WeftProto

@main
struct Weft: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "weft",
        abstract: "Weft: one POSIX file system over GPU hubs. CLI and node agent.",
        discussion: """
            SOURCE is a hub directory (served by an embedded hub in this process) or weft://HOST:PORT
            (a running weftd). A hub of a cluster is mounted as weft://HOST:PORT/VOLUME (one volume).
            Examples:
              weft format /srv/weft/hub
              weft mount /srv/weft/hub /mnt/weft --background
              weft status /srv/weft/hub --json
              weft umount /mnt/weft
            """,
        subcommands: [Format.self, Mount.self, Umount.self, Status.self, Fsck.self, CacheCommand.self, VolumeCommand.self,
                      HubCommand.self])
}

struct Format: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Create an embedded hub (a new, empty volume) in DIR.")

    @Argument(help: "Directory for the hub (created if missing).") var directory: String
    @Option(help: "Chunk size in bytes: a multiple of 65536 from 65536 to 67108864.") var chunkSize: Int = 4 << 20
    @Option(help: "Chunk compression: zstd or none.") var compression: String = "none"
    @Flag(help: "Erase an existing hub in DIR first.") var force = false

    func run() throws {
        guard let codec = Compression(name: compression) else {
            throw ValidationError("--compression must be zstd or none, not '\(compression)'")
        }
        let path = URL(fileURLWithPath: directory).standardizedFileURL.path
        try Hub.format(directory: path, chunkSizeBytes: chunkSize, compression: codec, force: force)
        print("formatted \(path): chunk size \(chunkSize) bytes, compression \(codec.name)")
    }
}

struct Mount: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Mount SOURCE at MOUNTPOINT with FUSE.",
        discussion: "Runs in the foreground until unmounted, unless --background is given.")

    @Argument(help: "Hub directory or weft://HOST:PORT.") var source: String
    @Argument(help: "An existing, empty directory.") var mountpoint: String
    @Flag(help: "Return once the mount is usable; the agent keeps running detached.") var background = false
    @Option(help: "Bound of buffered write data, MiB.") var writeBufferMb: Int = 256
    @Option(help: "Bound of the agent's block cache, MiB.") var cacheMb: Int = 1024
    @Option(help: "Embedded hub metadata durability: strict (fsync before reply) or periodic (fsync every second).")
    var durability: String = "strict"
    @Option(help: "Seconds the kernel may cache attributes and names.") var attrTimeout: Double = 1.0
    @Option(help: "Seconds after which a call to an unreachable remote hub fails (ETIMEDOUT) instead of waiting.")
    var hubTimeout: Double = Double(HubOpener.defaultRequestTimeoutMs) / 1000
    @Option(help: "Embedded hub: free disk space, MiB, that file data may not take, kept so that metadata changes (unlink, rmdir, truncate) still work on a full disk (default: 5% of the file system, at most 256 MiB; 0: none).")
    var reserveMb: Int?
    @Option(help: "Remote hub, zstd volume: where written data is compressed: agent (this process; the hub only checks it, and compressed bytes cross the network) or hub (raw bytes are sent; the hub compresses them: less CPU in all when agent and hub share one machine).")
    var uploadCompression: String = "agent"
    @Option(help: "Remote single hub on this machine: read file data from its chunk store directly (auto) rather than over TCP (off).")
    var localReads: String = "auto"
    @Option(help: "With --local-reads auto: write file data into that chunk store and have the hub take it over (auto) rather than send it over TCP (off).")
    var localWrites: String = "auto"
    @Option(help: "Write the agent's pid here once mounted.") var pidFile: String?
    @Option(help: "Agent log file for --background (default: /tmp/weft-agent-<mountpoint>.log).") var logFile: String?
    @Option(help: .hidden) var notifyFd: Int32?

    func validate() throws {
        if writeBufferMb < 4 { throw ValidationError("--write-buffer-mb must be at least 4") }
        if cacheMb < 1 { throw ValidationError("--cache-mb must be at least 1") }
        if DurabilityMode(rawValue: durability) == nil { throw ValidationError("--durability must be strict or periodic") }
        if attrTimeout < 0 { throw ValidationError("--attr-timeout must not be negative") }
        if !(0.1...3600).contains(hubTimeout) { throw ValidationError("--hub-timeout must be 0.1...3600 seconds") }
        if let reserveMb, !(0...(1 << 30)).contains(reserveMb) { throw ValidationError("--reserve-mb must be 0...1073741824") }
        if !["agent", "hub"].contains(uploadCompression) { throw ValidationError("--upload-compression must be agent or hub") }
        if !["auto", "off"].contains(localReads) { throw ValidationError("--local-reads must be auto or off") }
        if !["auto", "off"].contains(localWrites) { throw ValidationError("--local-writes must be auto or off") }
    }

    func run() throws {
        let parsedSource = try HubSource.parse(source)
        let point = URL(fileURLWithPath: mountpoint).standardizedFileURL.path
        if background {
            try Mounter.validateMountpoint(point)
            var arguments = ["mount", source, point, "--write-buffer-mb", "\(writeBufferMb)", "--cache-mb", "\(cacheMb)",
                             "--durability", durability, "--attr-timeout", "\(attrTimeout)", "--hub-timeout", "\(hubTimeout)",
                             "--upload-compression", uploadCompression, "--local-reads", localReads,
                             "--local-writes", localWrites]
            if let reserveMb { arguments += ["--reserve-mb", "\(reserveMb)"] }
            if let pidFile { arguments += ["--pid-file", URL(fileURLWithPath: pidFile).standardizedFileURL.path] }
            let log = logFile ?? "/tmp/weft-agent-\(point.replacingOccurrences(of: "/", with: "_")).log"
            try Background.spawnAgent(arguments: arguments, logFile: log)
            return
        }
        var request = MountRequest(source: parsedSource, mountpoint: point)
        request.vfs.writeBufferBytes = writeBufferMb << 20
        request.vfs.cacheBytes = cacheMb << 20
        request.durability = DurabilityMode(rawValue: durability)!
        request.mount.attributeTimeoutSeconds = attrTimeout
        request.mount.entryTimeoutSeconds = attrTimeout
        request.hubTimeoutMs = Int(hubTimeout * 1000)
        request.reserveBytes = reserveMb.map { UInt64($0) << 20 }
        request.compressUploads = uploadCompression == "agent"
        request.localReads = localReads == "auto"
        request.localWrites = localWrites == "auto"
        request.pidFile = pidFile
        request.notifyFD = notifyFd
        try Mounter.run(request, logger: WeftLogging.logger("weft.agent"))
    }
}

struct Umount: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Commit everything, unmount MOUNTPOINT and wait for its agent to exit.")

    @Argument(help: "A weft mountpoint.") var mountpoint: String
    @Option(help: "Longest wait for the agent to finish, seconds.") var timeout: Double = 120

    func run() throws {
        let point = URL(fileURLWithPath: mountpoint).standardizedFileURL.path
        guard MountTable.isWeftMount(point) else { throw WeftError(EINVAL, "\(point) is not a weft mount") }
        let pid = MountTable.agentPID(point)
        let result = umount2(point, 0)
        if result != 0 {
            let code = errno
            if code == EBUSY { throw WeftError(EBUSY, "\(point) is busy: close the files and directories open in it") }
            if code != EPERM { throw WeftError(code, "cannot unmount \(point)") }
            try runFusermount(point)
        }
        guard let pid else { return }
        let deadline = Date().addingTimeInterval(timeout)
        while kill(pid, 0) == 0 {
            if Date() > deadline { throw WeftError(ETIMEDOUT, "agent \(pid) is still committing data after \(Int(timeout)) s") }
            usleep(20_000)
        }
    }

    func runFusermount(_ point: String) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/fusermount3")
        process.arguments = ["-u", point]
        try process.run()
        process.waitUntilExit()
        if process.terminationStatus != 0 { throw WeftError(EBUSY, "fusermount3 -u \(point) failed") }
    }
}

struct CacheCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cache", abstract: "Manage a running agent's block cache.", subcommands: [CacheDrop.self, CacheStats.self])
}

struct CacheStats: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stats",
        abstract: "Show what the block cache of the agent serving MOUNTPOINT holds and has done (root only).",
        discussion: """
            Counters run from the agent's start: blocks (64 KiB) that readers found cached \
            (hits), fetched themselves (misses) and that were claimed ahead of them \
            (read-ahead); evictions, and hot blocks moved out of mostly evicted slabs. Memory: \
            the cache's slab memory against its bound (--cache-mb), slab memory in use and kept \
            for reuse, and the write buffer against --write-buffer-mb.
            """)

    @Argument(help: "A weft mountpoint.") var mountpoint: String
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        let path = URL(fileURLWithPath: mountpoint).standardizedFileURL.path
        let statistics = try MountTable.cacheStatistics(path)
        if json {
            print(String(decoding: try statistics.json(), as: UTF8.self))
            return
        }
        let cache = statistics.blockCache
        let looked = cache.hits + cache.misses
        let hitRate = looked == 0 ? "-" : String(format: "%.1f %%", Double(cache.hits) * 100 / Double(looked))
        func mib(_ bytes: Int) -> String { String(format: "%.1f MiB", Double(bytes) / 1_048_576) }
        print("""
            mountpoint        \(path)
            block cache       \(mib(cache.usedBytes)) of \(mib(cache.capacityBytes)), \(cache.blocks) blocks in \(cache.slabs) slabs
            hits              \(cache.hits) blocks (\(hitRate) of the blocks readers looked up)
            misses            \(cache.misses) blocks
            read-ahead        \(cache.readAheadClaims) blocks claimed
            evictions         \(cache.evictions) blocks
            relocations       \(cache.relocations) hot blocks moved out of evicted slabs
            slab memory       \(mib(statistics.slabsInUseBytes)) in use, \(mib(statistics.slabPooledBytes)) kept for reuse (budget \(mib(statistics.slabBudgetBytes)), \(statistics.slabAllocations) mapped)
            write buffer      \(mib(statistics.writeBufferUsedBytes)) of \(mib(statistics.writeBufferLimitBytes))
            """)
    }
}

struct CacheDrop: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "drop",
        abstract: "Drop the cached file data of the agent serving MOUNTPOINT (root only).",
        discussion: """
            The agent keeps running and keeps its memory for the next reads; buffered writes are \
            not touched. Pair it with `echo 3 > /proc/sys/vm/drop_caches` to empty the kernel's \
            page cache too.
            """)

    @Argument(help: "A weft mountpoint.") var mountpoint: String

    func run() throws {
        try MountTable.dropCache(URL(fileURLWithPath: mountpoint).standardizedFileURL.path)
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show volume size, inodes, chunks, space used and connected agents.")

    @Argument(help: "Hub directory or weft://HOST:PORT.") var source: String
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        let opened = try HubOpener.open(try HubSource.parse(source), recover: false,
                                         logger: WeftLogging.logger("weft", level: .warning))
        defer { opened.close() }
        let status = try opened.api.status()
        let free = Self.freeBytes(opened.api)
        if json {
            var object: [String: Any] = [
                "source": source,
                "chunkSizeBytes": status.volume.chunkSizeBytes,
                "compression": status.volume.compression.name,
                "volumeSizeBytes": status.logicalBytes,
                "inodes": status.inodes,
                "chunks": status.chunks,
                "spaceUsedBytes": status.storedBytes,
                "connectedAgents": status.connectedAgents,
                "agents": status.agents,
            ]
            if let free { object["freeBytes"] = free }
            let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            print("""
                source            \(source)
                chunk size        \(status.volume.chunkSizeBytes) bytes, compression \(status.volume.compression.name)
                volume size       \(status.logicalBytes) bytes (sum of file sizes)
                inodes            \(status.inodes)
                chunks            \(status.chunks)
                space used        \(status.storedBytes) bytes
                free for data     \(free.map { "\($0) bytes (free disk space less the hub's reserve)" } ?? "unknown (cluster hub)")
                connected agents  \(status.connectedAgents)
                """)
            for agent in status.agents { print("  \(agent)") }
        }
    }
}

extension Status {
    /// Room left for file data: the hub's disk free space less its reserve (SPEC.md §9.1), as
    /// `statfs` reports it to a session. Nil where the hub serves no volume session (a cluster
    /// hub's summary).
    static func freeBytes(_ api: HubAPI) -> UInt64? {
        guard let (session, _) = try? api.openSession(agentName: "weft-status") else { return nil }
        defer { try? api.closeSession(session) }
        guard let stats = try? api.statfs(RequestContext(session: session, credentials: .root)) else { return nil }
        return stats.freeBlocks * UInt64(stats.blockSizeBytes)
    }
}

struct Fsck: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check references, checksums and orphans. Exits 1 if problems remain (with --repair: any it could not fix).")

    @Argument(help: "Hub directory or weft://HOST:PORT.") var source: String
    @Flag(help: "Fix what can be fixed: dangling entries, link counts, orphans, damaged chunk references.") var repair = false
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        let opened = try HubOpener.open(try HubSource.parse(source), recover: false,
                                         logger: WeftLogging.logger("weft", level: .warning))
        defer { opened.close() }
        let report = try opened.api.fsck(repair: repair)
        // What is still wrong: every problem without --repair; with it, what the repair left.
        let remaining = report.unresolved
        if json {
            let object: [String: Any] = ["inodesChecked": report.inodesChecked, "chunksChecked": report.chunksChecked,
                                         "problems": report.problems, "repaired": report.repaired,
                                         "remaining": remaining, "clean": report.problems.isEmpty]
            let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            print("checked \(report.inodesChecked) inodes, \(report.chunksChecked) chunks")
            for problem in report.problems { print("problem: \(problem)") }
            for fix in report.repaired { print("repaired: \(fix)") }
            if report.problems.isEmpty {
                print("clean")
            } else if !repair {
                print("\(FsckReport.lineCount(report.problems)) problem(s)")
            } else if report.remaining == nil {
                print("\(FsckReport.lineCount(report.problems)) problem(s); this hub does not say which its repair left: run weft fsck again")
            } else {
                for problem in remaining { print("not repaired: \(problem)") }
                print("\(FsckReport.lineCount(report.problems)) problem(s), \(FsckReport.lineCount(remaining)) not repaired")
            }
        }
        if !remaining.isEmpty { throw ExitCode(1) }
    }
}
