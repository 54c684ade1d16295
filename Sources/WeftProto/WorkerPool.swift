import Foundation

/// A fixed set of threads that run blocking work (disk reads, network round trips) in the order
/// it was queued.
///
/// Dispatch's global and concurrent queues are no substitute on Linux: they run about as many
/// blocking items at once as there are CPUs (3 of 8 sleeping items on a 2-CPU machine), and
/// add threads only after a delay. Work that must really run N at once gets N threads here.
public final class WorkerPool: @unchecked Sendable {
    private let condition = NSCondition()
    private var queue: [() -> Void] = []
    private var head = 0

    /// Starts `threads` threads named `name`; they live as long as the process.
    public init(name: String, threads: Int) {
        precondition(threads > 0, "a worker pool needs a thread")
        for index in 0..<threads {
            let thread = Thread { [self] in run() }
            thread.name = "\(name)-\(index)"
            thread.start()
        }
    }

    /// Queues `work`; it runs on the first free thread.
    public func async(_ work: @escaping () -> Void) {
        condition.lock()
        queue.append(work)
        condition.signal()
        condition.unlock()
    }

    private func run() {
        while true {
            condition.lock()
            while head == queue.count { condition.wait() }
            let work = queue[head]
            head += 1
            if head > 1024 && head * 2 > queue.count {
                queue.removeFirst(head)
                head = 0
            }
            condition.unlock()
            work()
        }
    }

    /// Runs every item of `items` on a thread of its own and returns when all are done: for a
    /// handful of items that block for a long time (recalls waiting for answers), which must not
    /// wait for each other or for any pool.
    public static func runConcurrently<T>(_ items: [T], _ body: @escaping @Sendable (T) -> Void) {
        guard items.count > 1 else {
            items.first.map(body)
            return
        }
        let group = DispatchGroup()
        for item in items {
            group.enter()
            Thread.detachNewThread {
                body(item)
                group.leave()
            }
        }
        group.wait()
    }

    /// Runs `work` on a new thread of its own, now.
    public static func detach(_ work: @escaping @Sendable () -> Void) {
        Thread.detachNewThread(work)
    }
}
